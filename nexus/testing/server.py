"""The mock backend's HTTP side: a lean ``twisted.web`` site, its one resource and ``MockBackend``.

Plain ``twisted.web`` (one leaf resource, no access log, no per-request timers) because the mock is
also the "direct backend" the benchmarks compare the gateway against, so the non-streaming path
serves precomputed bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from nexus.testing.bodies import (
    ERROR_404,
    ERROR_405,
    ERROR_500,
    ERROR_503,
    ERROR_HEALTH,
    HALF_EVENT,
    ID_PLACEHOLDER,
    Refusal,
    check_chat_body,
    check_completions_body,
    check_embeddings_body,
    completion_body,
    embeddings_body,
    endless_events,
    error,
    missing_endpoint,
    parse_inputs,
    stream_events,
    text_completion_body,
    text_stream_events,
)
from nexus.testing.settings import (
    ENDPOINTS,
    HUGE_LENGTH,
    RESET_AFTER_SECONDS,
    SETTING_NAMES,
    MockSettings,
)

__all__ = [
    "DelayedCallLike",
    "ListeningPortLike",
    "MockBackend",
    "ReactorLike",
    "default_reactor",
    "listen_mock",
]

# How an inference request ended (see MockBackend.stats).
COMPLETED, DISCONNECTED, ABORTED = "completed", "disconnected", "aborted"

# The inference endpoints (``MockSettings.endpoints``) and the endpoint of each path.
CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"
_ENDPOINT_OF = {path.encode("ascii"): name for name, path in ENDPOINTS.items()}
# Index of a stream's first content event: a chat stream starts with a role event.
_FIRST_CONTENT = {CHAT: 1, COMPLETIONS: 0}
# What "huge_length" writes of the body it announces.
_HUGE_PREFIX = {
    CHAT: b'{"id": "chatcmpl-',
    COMPLETIONS: b'{"id": "cmpl-',
    EMBEDDINGS: b'{"object": "list", ',
}

_JSON = b"application/json"
_SSE = b"text/event-stream"
_NO_CACHE = b"no-cache"
_CLOSE = b"close"
_HOP_NAME = b"x-mock-hop"
_HOP_VALUE = b"1"
#: The ``Connection`` tokens naming the mock's own headers as hop-by-hop.
_HOP_NAMES = b"x-mock-hop, x-mock-backend"


# Structural types for the few reactor, timer, port and transport methods used here: the
# zope interfaces do not type-check method calls without the mypy-zope plugin.


class DelayedCallLike(Protocol):
    """What the mock needs of an ``IDelayedCall``."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ListeningPortLike(Protocol):
    """What the mock needs of an ``IListeningPort``."""

    def getHost(self) -> Any: ...

    def stopListening(self) -> Deferred[None] | None: ...


class ReactorLike(Protocol):
    """The reactor methods the mock uses (time and TCP)."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: Any, **kw: Any
    ) -> DelayedCallLike: ...

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> ListeningPortLike: ...


def default_reactor() -> ReactorLike:
    """The global reactor, imported late: importing the mock must not install it."""
    from twisted.internet import reactor

    return reactor


# -- Twisted site, channel, request ----------------------------------------------------------


class _MockRequest(server.Request):
    """A request that reports the end of an inference request to the backend, however it ends.

    Finishing and losing the connection both pass through here, so the in-flight, completed
    and disconnect counts need no per-request Deferred, and a pending timer (latency, next
    stream event, reset) is cancelled the moment the client goes away.
    """

    mock_backend: MockBackend | None = None
    mock_timer: DelayedCallLike | None = None
    # Set when the mock itself cuts the connection, so that is not counted as a client leaving.
    mock_closing: bool = False

    def finish(self) -> None:
        """Finish the response and count the inference request as completed."""
        super().finish()
        backend = self.mock_backend
        if backend is not None:
            self.mock_backend = None
            backend._inference_ended(self, COMPLETED)

    def connectionLost(self, reason: Failure) -> None:
        """Cancel any pending timer and count the inference request as cut off."""
        super().connectionLost(reason)
        timer = self.mock_timer
        if timer is not None:
            self.mock_timer = None
            if timer.active():
                timer.cancel()
        backend = self.mock_backend
        if backend is not None:
            self.mock_backend = None
            backend._inference_ended(self, ABORTED if self.mock_closing else DISCONNECTED)


class _MockChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that its site tracks until the connection is lost.

    Used bare, without Twisted's TLS/HTTP2-negotiating wrapper: the mock speaks plain HTTP/1.1
    and the wrapper costs an extra call on every event.
    """

    site: _MockSite

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget this connection, then let the channel clean up its requests."""
        super().connectionLost(reason)
        self.site.channel_closed(self)


class _MockSite(server.Site):
    """A Site without access log, log timer or idle timeouts, that tracks its connections."""

    noisy = False
    # Twisted types this as its negotiating wrapper's factory; any channel class will do.
    protocol = _MockChannel  # type: ignore[assignment]
    requestFactory = _MockRequest

    def __init__(self, resource: Resource, reactor: ReactorLike) -> None:
        # timeout=None: an idle-timeout DelayedCall per connection would cost time on every
        # read and show up in tests that check for leaked delayed calls.
        super().__init__(resource, timeout=None, reactor=reactor, parsePOSTFormSubmission=False)
        self.connections = 0
        self.open: set[_MockChannel] = set()
        self._drained: list[Deferred[None]] = []

    def startFactory(self) -> None:
        """Do nothing: the base opens the legacy log and starts a 1 s log-timestamp timer."""

    def stopFactory(self) -> None:
        """Do nothing (see ``startFactory``)."""

    def log(self, request: http.Request) -> None:
        """Write no access log line (the benchmarks' direct backend must stay cheap)."""

    def buildProtocol(self, addr: Any) -> Any:
        """Build a channel and track it until its connection is lost."""
        channel = super().buildProtocol(addr)
        self.connections += 1
        self.open.add(channel)
        return channel

    def channel_closed(self, channel: _MockChannel) -> None:
        """Forget a closed connection; fire ``abort_all`` waiters once none is left."""
        self.open.discard(channel)
        if not self.open and self._drained:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def abort_all(self) -> Deferred[None]:
        """Abort every open connection; fire when all of them are gone."""
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        for channel in list(self.open):
            channel.transport.abortConnection()  # type: ignore[union-attr]
        return d


Handler = Callable[[_MockRequest], object]


class _MockResource(Resource):
    """The whole URL space as one leaf: a dict lookup by path, then by method."""

    isLeaf = True

    def __init__(self, backend: MockBackend) -> None:
        super().__init__()
        self.backend = backend
        b = backend
        self.routes: dict[bytes, dict[bytes, Handler]] = {
            b"/v1/chat/completions": {b"POST": b._chat},
            b"/v1/completions": {b"POST": b._completions},
            b"/v1/embeddings": {b"POST": b._embeddings},
            b"/v1/models": {b"GET": b._models},
            b"/api/tags": {b"GET": b._tags},
            b"/health": {b"GET": b._health},
            b"/_mock/config": {b"GET": b._get_config, b"POST": b._post_config},
            b"/_mock/stats": {b"GET": b._get_stats},
            b"/_mock/reset": {b"POST": b._post_reset},
        }

    def render(self, request: _MockRequest) -> object:
        """Add the headers every response carries, then dispatch."""
        headers = request.responseHeaders
        headers.setRawHeaders(b"x-mock-backend", [self.backend.name_bytes])
        # The mock's own headers are hop-by-hop (listed in Connection): a proxy in front
        # strips them, so they never reach the clients of a gateway. addRawHeader keeps a
        # "close" that Twisted may already have set, so clients still see that it ends.
        headers.addRawHeader(b"connection", _HOP_NAMES)
        headers.setRawHeaders(_HOP_NAME, [_HOP_VALUE])
        methods = self.routes.get(request.path)
        if methods is None:
            return _not_found(request)
        handler = methods.get(request.method)
        if handler is None:
            endpoint = _ENDPOINT_OF.get(request.path)
            if endpoint is not None and endpoint not in self.backend.settings.endpoints:
                # A server lacking the path says so whatever the method.
                return self.backend._missing(request)
            request.responseHeaders.setRawHeaders(b"allow", [b", ".join(methods)])
            return _answer(request, 405, ERROR_405)
        return handler(request)


# -- writing responses -----------------------------------------------------------------------


def _not_found(request: server.Request) -> bytes:
    return _answer(request, 404, ERROR_404)


def _answer(request: server.Request, status: int, body: bytes) -> bytes:
    """Answer synchronously from ``render`` (Twisted adds Content-Length and finishes)."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [_JSON])
    return body


def _send(request: _MockRequest, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    """Write a whole response and finish it."""
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [content_type])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def _start_stream(request: _MockRequest, framing: str) -> None:
    """Set up a 200 event stream; with ``framing="close"`` also send its head right away."""
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [_SSE])
    headers.setRawHeaders(b"cache-control", [_NO_CACHE])
    if framing == "close":
        _send_close_delimited_head(request)


def _send_close_delimited_head(request: _MockRequest) -> None:
    """Write the status line and headers of a close-delimited body on the transport ourselves.

    Twisted's ``Request.write`` would pick chunked encoding for an HTTP/1.1 body without a
    Content-Length. Marking the head as written (``startedWriting``) makes it pass the body
    through as is and makes ``finish`` add nothing; a non-persistent channel closes the
    connection once the request is finished, which is what ends the body. Both attributes
    are public on ``twisted.web.http``; ``test_stream_framing_close_on_the_wire`` pins them.
    """
    headers = request.responseHeaders
    headers.setRawHeaders(b"connection", [_CLOSE, _HOP_NAMES])
    headers.removeHeader(b"content-length")
    headers.removeHeader(b"transfer-encoding")
    head = [b"HTTP/1.1 200 OK\r\n"]
    for name, values in headers.getAllRawHeaders():
        head.extend(b"%s: %s\r\n" % (name, value) for value in values)
    head.append(b"\r\n")
    _transport(request).writeSequence(head)
    request.startedWriting = 1
    request.channel.persistent = False


def _nothing(request: _MockRequest) -> None:
    """Leave the request open, saying nothing (hang, stall)."""


def _huge_length(request: _MockRequest, prefix: bytes) -> None:
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [_JSON])
    headers.setRawHeaders(b"content-length", [b"%d" % HUGE_LENGTH])
    request.write(prefix)


def _finish(request: _MockRequest) -> None:
    request.finish()


def _finish_close(request: _MockRequest) -> None:
    transport = _transport(request)
    request.finish()
    transport.loseConnection()


def _read(request: server.Request) -> bytes:
    content = request.content
    return content.read() if content is not None else b""


def _transport(request: server.Request) -> Any:
    # Saved by http.Request at creation; still set after finish() drops the channel.
    return request.transport


def _abort(request: _MockRequest) -> None:
    request.mock_timer = None
    request.mock_closing = True
    _transport(request).abortConnection()


def _close(request: _MockRequest) -> None:
    request.mock_closing = True
    _transport(request).loseConnection()


# -- the backend -----------------------------------------------------------------------------


class MockBackend:
    """One fake inference server: its settings, its counters and its HTTP resource tree.

    ``resource`` is the root ``Resource``; ``site`` the ``Site`` serving it; after ``listen``,
    ``port`` and ``url`` say where it is.
    """

    def __init__(self, settings: MockSettings | None = None, reactor: ReactorLike | None = None):
        self.settings = settings if settings is not None else MockSettings()
        self.reactor: ReactorLike = reactor if reactor is not None else default_reactor()
        self.resource = _MockResource(self)
        self.site = _MockSite(self.resource, self.reactor)
        self.port: ListeningPortLike | None = None
        self._name = ""
        self._name_bytes = b""
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._streams: dict[tuple[Any, ...], list[bytes]] = {}
        self._flap_state: dict[bytes, bool] = {}
        self._in_flight: set[_MockRequest] = set()
        # Response ids keep counting across reset(), so no two answers share one.
        self._ids = itertools.count(1)
        self._reset_counters()

    # -- public ----------------------------------------------------------------------------

    @property
    def name_bytes(self) -> bytes:
        """``settings.name`` as bytes, for the ``x-mock-backend`` header."""
        name = self.settings.name
        if name != self._name:
            self._name, self._name_bytes = name, name.encode("utf-8")
        return self._name_bytes

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening port (127.0.0.1 if bound to all interfaces)."""
        if self.port is None:
            raise RuntimeError("the mock backend is not listening")
        address = self.port.getHost()
        host = address.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{address.port}"

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> ListeningPortLike:
        """Listen on TCP ``interface:port`` (synchronous; raises CannotListenError)."""
        # A deep listen queue: tests and benchmarks open hundreds of connections at once.
        self.port = self.reactor.listenTCP(port, self.site, backlog=1024, interface=interface)
        return self.port

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every open connection; fires when all are closed."""
        for request in self._in_flight:
            request.mock_closing = True
        waits: list[Deferred[Any]] = [self.site.abort_all()]
        if self.port is not None:
            stopped = self.port.stopListening()
            self.port = None
            if stopped is not None:
                waits.append(stopped)
        d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def configure(self, **changes: Any) -> None:
        """Change knobs at once: all are validated before any is applied.

        Raises KeyError for an unknown name and ValueError for a bad value.
        """
        unknown = sorted(set(changes) - SETTING_NAMES)
        if unknown:
            raise KeyError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(SETTING_NAMES))}"
            )
        checked = attrs.evolve(self.settings, **changes)
        for name in changes:
            setattr(self.settings, name, getattr(checked, name))
        if "flap" in changes:
            self._flap_state.clear()

    def stats(self) -> dict[str, Any]:
        """Counters since start (or the last reset), as ``GET /_mock/stats`` answers them.

        ``requests_by_endpoint`` counts the POSTs to each inference endpoint (``chat``,
        ``completions``, ``embeddings``), refused ones and those to an endpoint the mock lacks
        included; ``chat_requests`` is its ``chat`` count. ``in_flight``, ``completed``,
        ``disconnects`` (the client left before the response ended) and ``aborted`` (the mock
        cut it off itself: reset, truncated, ``stop``) cover the requests of every inference
        endpoint. ``last_request`` is the last inference request: its ``path``, ``endpoint``,
        ``body`` (the JSON, or the text if it is not JSON) and ``headers``.
        """
        last: dict[str, Any] | None = None
        if self._last_request is not None:
            path, body, headers = self._last_request
            last = {
                "path": path.decode("latin-1"),
                "endpoint": _ENDPOINT_OF[path],
                "body": body,
                "headers": {
                    name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
                    for name, values in headers.getAllRawHeaders()
                },
            }
        return {
            "chat_requests": self.chat_requests,
            "requests_by_endpoint": dict(self._requests),
            "in_flight": len(self._in_flight),
            "completed": self.completed,
            "disconnects": self.disconnects,
            "aborted": self.aborted,
            "health_checks": self.health_checks,
            "connections": self.site.connections,
            "open_connections": len(self.site.open),
            "last_request": last,
        }

    @property
    def chat_requests(self) -> int:
        """How many ``POST /v1/chat/completions`` requests came since start (or reset)."""
        return self._requests[CHAT]

    def reset(self) -> None:
        """Zero the counters and forget the last request (settings are kept)."""
        self._reset_counters()
        self.site.connections = 0

    # -- internals -------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._requests = dict.fromkeys(ENDPOINTS, 0)
        self.completed = 0
        self.disconnects = 0
        self.aborted = 0
        self.health_checks = 0
        self._last_request: tuple[bytes, Any, Any] | None = None

    def _inference_ended(self, request: _MockRequest, outcome: str) -> None:
        self._in_flight.discard(request)
        if outcome == COMPLETED:
            self.completed += 1
        elif outcome == DISCONNECTED:
            self.disconnects += 1
        else:
            self.aborted += 1

    def _later(self, request: _MockRequest, delay_ms: float, action: Handler) -> object:
        if delay_ms > 0:
            request.mock_timer = self.reactor.callLater(
                delay_ms / 1000.0, self._fire, request, action
            )
        else:
            action(request)
        return server.NOT_DONE_YET

    @staticmethod
    def _fire(request: _MockRequest, action: Handler) -> None:
        request.mock_timer = None
        action(request)

    # -- inference -------------------------------------------------------------------------

    def _chat(self, request: _MockRequest) -> object:
        return self._inference(request, CHAT)

    def _completions(self, request: _MockRequest) -> object:
        return self._inference(request, COMPLETIONS)

    def _embeddings(self, request: _MockRequest) -> object:
        return self._inference(request, EMBEDDINGS)

    def _inference(self, request: _MockRequest, endpoint: str) -> object:
        """What every inference request goes through: count, record, lack, fail, answer."""
        self._requests[endpoint] += 1
        n = next(self._ids)
        request.mock_backend = self
        self._in_flight.add(request)
        raw = _read(request)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self._last_request = (request.path, body, request.requestHeaders)
        settings = self.settings
        if endpoint not in settings.endpoints:
            return self._missing(request)
        # Embeddings never stream: "stream" in their body is ignored.
        stream = endpoint != EMBEDDINGS and isinstance(body, dict) and body.get("stream") is True
        fail = settings.fail
        if fail is not None and settings.fail_count == 0:
            settings.fail, settings.fail_count = None, -1
        elif fail is not None:
            if settings.fail_count > 0:
                settings.fail_count -= 1
                if settings.fail_count == 0:
                    # This request is the last one the failure applies to.
                    settings.fail, settings.fail_count = None, -1
            action = self._failure(fail, endpoint, stream, body, n)
            return self._later(request, settings.latency_ms, action)
        if endpoint == CHAT:
            refused = check_chat_body(body, settings.models)
        elif endpoint == COMPLETIONS:
            refused = check_completions_body(body, settings.models)
        else:
            refused = check_embeddings_body(body, settings.models)
        if refused is not None:
            return self._refuse(request, refused)
        model = body["model"]
        if stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            events = self._stream(endpoint, model, usage, n)
            # Finishing also ends a close-delimited stream: its channel is not persistent.
            play = partial(
                self._start_play, events=events, end=_finish, first=_FIRST_CONTENT[endpoint]
            )
            return self._later(request, settings.latency_ms, play)
        if endpoint == EMBEDDINGS:
            # Checked above: the input is well formed.
            inputs = parse_inputs(body["input"]) or []
            encoding = "base64" if body.get("encoding_format") == "base64" else "float"
            payload = embeddings_body(settings, model, inputs, encoding)
        else:
            payload = self._body(endpoint, model).replace(ID_PLACEHOLDER, b"%d" % n)
        if settings.latency_ms > 0:
            return self._later(
                request, settings.latency_ms, partial(_send, status=200, body=payload)
            )
        # The hot path: Twisted sets Content-Length, writes and finishes.
        request.responseHeaders.setRawHeaders(b"content-type", [_JSON])
        return payload

    def _missing(self, request: _MockRequest) -> object:
        """Answer as a server that lacks the requested endpoint."""
        status = self.settings.missing_endpoint_status
        if status == 405:
            # An empty Allow: the resource allows no method (RFC 9110, 10.2.1).
            request.responseHeaders.setRawHeaders(b"allow", [b""])
        return _answer(request, status, missing_endpoint(status, request.path.decode("latin-1")))

    def _refuse(self, request: _MockRequest, refusal: Refusal) -> object:
        status, body = refusal
        return self._later(
            request, self.settings.latency_ms, partial(_send, status=status, body=body)
        )

    def _body(self, endpoint: str, model: str) -> bytes:
        """The cached non-streamed chat or completions answer, with ``ID_PLACEHOLDER``."""
        s = self.settings
        key = (endpoint, model, s.name, s.stream_chunks, s.prompt_tokens, s.completion_tokens)
        template = self._bodies.get(key)
        if template is None:
            if len(self._bodies) > 1000:
                self._bodies.clear()
            make = completion_body if endpoint == CHAT else text_completion_body
            template = self._bodies[key] = make(s, model)
        return template

    def _stream(self, endpoint: str, model: str, usage: bool, n: int) -> list[bytes]:
        s = self.settings
        key = (
            endpoint,
            model,
            usage,
            s.name,
            s.stream_chunks,
            s.first_token_delay_ms > 0,
            s.prompt_tokens,
            s.completion_tokens,
        )
        events = self._streams.get(key)
        if events is None:
            if len(self._streams) > 1000:
                self._streams.clear()
            make = stream_events if endpoint == CHAT else text_stream_events
            events = self._streams[key] = make(s, model, usage)
        stream_id = b"%d" % n
        return [e.replace(ID_PLACEHOLDER, stream_id) for e in events]

    def _start_play(
        self,
        request: _MockRequest,
        events: list[bytes],
        end: Callable[[_MockRequest], None],
        first: int,
    ) -> None:
        """Start a 200 event stream, then play ``events`` (see ``_play``).

        ``first`` is the index of the first content event: 1 after a chat stream's role event,
        0 in a completions stream, whose headers then go out alone before the first-token wait.
        """
        request.mock_timer = None
        settings = self.settings
        _start_stream(request, settings.stream_framing)
        delay = settings.first_token_delay_ms
        if first == 0 and delay > 0:
            request.write(b"")  # the headers, now
            request.mock_timer = self.reactor.callLater(
                delay / 1000.0, self._play, request, events, 0, end, first
            )
            return
        self._play(request, events, 0, end, first)

    def _play(
        self,
        request: _MockRequest,
        events: list[bytes],
        index: int,
        end: Callable[[_MockRequest], None],
        first: int,
    ) -> None:
        """Write ``events[index:]`` one write each, then ``end``.

        Events are ``stream_delay_ms`` apart, except that the first content event (index
        ``first``) waits ``first_token_delay_ms`` when that is set.
        """
        request.mock_timer = None
        settings = self.settings
        first_token, gap = settings.first_token_delay_ms, settings.stream_delay_ms
        while index < len(events):
            request.write(events[index])
            index += 1
            if index == len(events):
                break
            delay = first_token if index == first and first_token > 0 else gap
            if delay > 0:
                request.mock_timer = self.reactor.callLater(
                    delay / 1000.0, self._play, request, events, index, end, first
                )
                return
        end(request)

    def _endless(self, request: _MockRequest, events: Iterator[bytes]) -> None:
        request.mock_timer = None
        request.write(next(events))
        delay = max(self.settings.stream_delay_ms, 1.0) / 1000.0
        request.mock_timer = self.reactor.callLater(delay, self._endless, request, events)

    def _failure(self, mode: str, endpoint: str, stream: bool, body: Any, n: int) -> Handler:
        """The action that answers one inference request in failure ``mode``."""
        if mode == "500":
            return partial(_send, status=500, body=ERROR_500)
        if mode == "503":
            return partial(_send, status=503, body=ERROR_503)
        if mode == "hang":
            return _nothing
        if mode == "close":
            return _close
        if mode == "invalid_json":
            return partial(_send, status=200, body=b"not json{")
        if mode == "huge_length":
            return partial(_huge_length, prefix=_HUGE_PREFIX[endpoint])
        settings = self.settings
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            model = settings.models[0] if settings.models else "mock-model"
        if mode == "endless":
            if stream:
                return partial(self._endless_stream, model=model, chat=endpoint == CHAT)
            return self._endless_json
        if stream:
            events = self._stream(endpoint, model, False, n)
            first = _FIRST_CONTENT[endpoint]
            if mode == "reset":
                return partial(
                    self._start_play, events=events[:1], end=self._abort_soon, first=first
                )
            if mode == "stall":
                return partial(self._start_play, events=events[:2], end=_nothing, first=first)
            if mode == "truncated_sse":
                return partial(self._truncated_stream, events=[events[0], HALF_EVENT], first=first)
        else:
            whole = self._whole_body(endpoint, body, model, n)
            if mode == "reset":
                return partial(self._partial, body=whole, end=self._abort_soon)
            if mode == "stall":
                return partial(self._partial, body=whole, end=_nothing)
            if mode == "truncated_sse":
                return partial(self._partial, body=whole, end=_close)
        raise AssertionError(f"unhandled fail mode {mode!r}")

    def _whole_body(self, endpoint: str, body: Any, model: str, n: int) -> bytes:
        """The answer a failure cuts short: the request's own, as far as it is well formed."""
        if endpoint != EMBEDDINGS:
            return self._body(endpoint, model).replace(ID_PLACEHOLDER, b"%d" % n)
        fields = body if isinstance(body, dict) else {}
        inputs = parse_inputs(fields.get("input")) or [""]
        encoding = "base64" if fields.get("encoding_format") == "base64" else "float"
        return embeddings_body(self.settings, model, inputs, encoding)

    @staticmethod
    def _partial(request: _MockRequest, body: bytes, end: Callable[[_MockRequest], None]) -> None:
        """Announce ``body`` in full but write only its first half, then ``end``."""
        request.setResponseCode(200)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [_JSON])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body[: len(body) // 2])
        end(request)

    def _truncated_stream(self, request: _MockRequest, events: list[bytes], first: int) -> None:
        if self.settings.stream_framing == "close":
            # Close-delimited: the connection ends mid-event, which is the whole body.
            self._start_play(request, events, _close, first)
            return
        # Tell the client the connection ends here, so no pool reuses it.
        request.responseHeaders.addRawHeader(b"connection", _CLOSE)
        self._start_play(request, events, _finish_close, first)

    def _endless_stream(self, request: _MockRequest, model: str, chat: bool) -> None:
        _start_stream(request, self.settings.stream_framing)
        self._endless(request, endless_events(self.settings.name, model, chat))

    def _abort_soon(self, request: _MockRequest) -> None:
        request.mock_timer = self.reactor.callLater(RESET_AFTER_SECONDS, _abort, request)

    def _endless_json(self, request: _MockRequest) -> None:
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [_JSON])
        self._endless(request, itertools.chain([b"{"], itertools.repeat(b" ")))

    # -- discovery -------------------------------------------------------------------------

    def _probe(self, request: _MockRequest, body: Callable[[], bytes]) -> object:
        self.health_checks += 1
        settings = self.settings
        failing = settings.health_fail
        if settings.flap:
            path = request.path
            failing = failing or self._flap_state.get(path, False)
            self._flap_state[path] = not self._flap_state.get(path, False)
        if failing:
            action = partial(_send, status=500, body=ERROR_HEALTH)
        else:
            action = partial(_send, status=200, body=body())
        return self._later(request, settings.health_latency_ms, action)

    def _models(self, request: _MockRequest) -> object:
        def body() -> bytes:
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "mock"}
                for m in self.settings.models
            ]
            return json.dumps({"object": "list", "data": data}).encode("utf-8")

        return self._probe(request, body)

    def _tags(self, request: _MockRequest) -> object:
        if self.settings.type != "ollama":
            return _not_found(request)

        def body() -> bytes:
            models = [
                {
                    "name": m,
                    "model": m,
                    "modified_at": "2024-01-01T00:00:00Z",
                    "size": 4_000_000_000,
                    "digest": "0" * 64,
                    "details": {
                        "format": "gguf",
                        "family": "llama",
                        "parameter_size": "8B",
                        "quantization_level": "Q4_0",
                    },
                }
                for m in self.settings.models
            ]
            return json.dumps({"models": models}).encode("utf-8")

        return self._probe(request, body)

    def _health(self, request: _MockRequest) -> object:
        kind = self.settings.type
        if kind == "llamacpp":
            return self._probe(request, lambda: b'{"status": "ok"}')
        if kind == "vllm":
            # vLLM answers its /health with an empty 200.
            return self._probe(request, lambda: b"")
        return _not_found(request)

    # -- control API -----------------------------------------------------------------------

    def _get_config(self, request: _MockRequest) -> object:
        return _answer(request, 200, json.dumps(self.settings.to_dict()).encode("utf-8"))

    def _post_config(self, request: _MockRequest) -> object:
        try:
            changes = json.loads(_read(request))
        except ValueError:
            changes = None
        if not isinstance(changes, dict):
            refusal = error("The body must be a JSON object of settings.", "invalid_request_error")
            return _answer(request, 400, refusal)
        try:
            self.configure(**changes)
        except KeyError as e:
            return _answer(request, 400, error(e.args[0], "invalid_request_error"))
        except (ValueError, TypeError) as e:
            return _answer(request, 400, error(str(e), "invalid_request_error"))
        return self._get_config(request)

    def _get_stats(self, request: _MockRequest) -> object:
        return _answer(request, 200, json.dumps(self.stats()).encode("utf-8"))

    def _post_reset(self, request: _MockRequest) -> object:
        self.reset()
        return self._get_stats(request)


def listen_mock(
    reactor: ReactorLike | None = None,
    settings: MockSettings | None = None,
    port: int = 0,
    interface: str = "127.0.0.1",
) -> MockBackend:
    """Start a mock backend listening on ``interface:port`` (synchronous).

    ``port=0`` picks a free port; read it back from ``.url`` / ``.port``. Call ``.stop()``
    (a Deferred) when done: it stops listening and aborts open connections.
    """
    backend = MockBackend(settings, reactor)
    backend.listen(port, interface)
    return backend
