"""A fake inference server: OpenAI-compatible chat plus Ollama / llama.cpp discovery.

The gateway's demo mode, its tests and its benchmarks talk to this server over real HTTP. It is
plain ``twisted.web`` (one leaf resource, no access log, no per-request timers) because it is
also the "direct backend" the benchmarks compare the gateway against, so the non-streaming path
serves precomputed bytes.

Knobs (``MockSettings``) can be changed at runtime, in process (``MockBackend.configure``) or over
HTTP (``POST /_mock/config``), to make the server slow, failing or broken in specific ways.

In process::

    backend = listen_mock(reactor, MockSettings(models=["m1"]))   # port 0 on 127.0.0.1
    backend.url                                                   # "http://127.0.0.1:<port>"
    await backend.stop()

As a process: ``twistd -n nexus-mock --port 9001 --models m1,m2 --type ollama``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from nexus.config import BACKEND_TYPES

__all__ = [
    "BACKEND_TYPES",
    "FAIL_MODES",
    "HUGE_LENGTH",
    "SETTING_NAMES",
    "MockBackend",
    "MockService",
    "MockSettings",
    "Options",
    "listen_mock",
    "makeService",
    "stream_piece",
]

#: Values of ``MockSettings.fail``; what each does is described on ``MockSettings``.
FAIL_MODES = (
    "500",
    "503",
    "hang",
    "reset",
    "invalid_json",
    "stall",
    "truncated_sse",
    "huge_length",
    "endless",
)

#: ``usage.completion_tokens`` of a non-streaming answer (a stream counts its content events).
NON_STREAM_COMPLETION_TOKENS = 5

#: How long "reset" waits between writing part of a response and aborting the connection, so the
#: part is flushed to the client first (an abort discards whatever is still buffered).
RESET_AFTER_SECONDS = 0.05

#: The Content-Length that "huge_length" announces (2 GiB, one past the largest int32).
HUGE_LENGTH = 2147483648

# How a chat request ended (see MockBackend.stats).
COMPLETED, DISCONNECTED, ABORTED = "completed", "disconnected", "aborted"

_ID = "@@MOCK_ID@@"
_ID_BYTES = _ID.encode("ascii")
_DONE = b"data: [DONE]\n\n"
_HALF_EVENT = b'data: {"id": '
_JSON = b"application/json"
_SSE = b"text/event-stream"
_NO_CACHE = b"no-cache"
_HOP_NAME = b"x-mock-hop"
_HOP_VALUE = b"1"


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


def _default_reactor() -> ReactorLike:
    # Imported late: importing this module must not install the global reactor.
    from twisted.internet import reactor

    return reactor


# -- settings --------------------------------------------------------------------------------


def _non_negative(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _int_at_least(low: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{attribute.name} must be an integer >= {low}, got {value!r}")

    return check


def _optional_count(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _int_at_least(0)(inst, attribute, value)


def _one_of(
    choices: Sequence[str | None],
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            shown = ", ".join("null" if c is None else c for c in choices)
            raise ValueError(f"{attribute.name} must be one of {shown}; got {value!r}")

    return check


def _string(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _model_list(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError(f"{attribute.name} must be a list of non-empty strings, got {value!r}")


def _bool(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, got {value!r}")


@attrs.define
class MockSettings:
    """The mock's knobs; mutable, and validated on every assignment.

    ``type`` decides which discovery endpoints answer (``/api/tags`` for ollama, ``/health`` for
    llamacpp and vllm, ``/v1/models`` for all). ``latency_ms`` delays the headers of every chat
    response, ``health_latency_ms`` those of every discovery response.

    ``fail`` makes ``POST /v1/chat/completions`` misbehave, for the next ``fail_count`` chat
    requests (then it clears itself; -1 = until changed):

    - ``"500"`` / ``"503"``: that status with an OpenAI error body.
    - ``"hang"``: never answer; the request stays open until the client leaves.
    - ``"reset"``: headers and part of the body (one event for a stream), then a TCP reset.
    - ``"invalid_json"``: 200, ``application/json``, body ``not json{`` (streams too).
    - ``"stall"``: stream: headers and two events, then silence with the connection open;
      non-stream: headers with the full Content-Length and half the body, then silence.
    - ``"truncated_sse"``: stream: one event and half of the next, then the chunked body is ended
      properly and the connection closed (a clean end without ``[DONE]``); non-stream: half the
      announced body, then the connection is closed (FIN, not reset).
    - ``"huge_length"``: 200 with ``Content-Length: 2147483648``, a few bytes, then silence.
    - ``"endless"``: stream: an event every ``max(stream_delay_ms, 1)`` ms until the client
      leaves; non-stream: a chunked JSON body that never ends (a space every interval).

    ``health_fail`` makes discovery endpoints answer 500; ``flap`` makes each discovery path
    alternate success / 500 on every probe (first one succeeds; paths alternate independently,
    so a check that probes two paths sees both succeed or both fail).
    ``completion_tokens`` overrides ``usage.completion_tokens``; by default it is the number of
    content events (``stream_chunks``) for a stream and 5 otherwise.
    """

    name: str = attrs.field(default="mock", validator=_string)
    models: list[str] = attrs.field(factory=lambda: ["mock-model"], validator=_model_list)
    type: str = attrs.field(default="openai", validator=_one_of(BACKEND_TYPES))
    latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    stream_chunks: int = attrs.field(default=5, validator=_int_at_least(0))
    stream_delay_ms: float = attrs.field(default=0.0, validator=_non_negative)
    fail: str | None = attrs.field(default=None, validator=_one_of((None, *FAIL_MODES)))
    fail_count: int = attrs.field(default=-1, validator=_int_at_least(-1))
    health_fail: bool = attrs.field(default=False, validator=_bool)
    flap: bool = attrs.field(default=False, validator=_bool)
    health_latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    prompt_tokens: int = attrs.field(default=10, validator=_int_at_least(0))
    completion_tokens: int | None = attrs.field(default=None, validator=_optional_count)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (what ``GET /_mock/config`` answers)."""
        return attrs.asdict(self)


SETTING_NAMES = frozenset(a.name for a in attrs.fields(MockSettings))


# -- bodies ----------------------------------------------------------------------------------


def _error(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode("utf-8")


_ERROR_500 = _error("mock backend failure (fail=500)", "server_error", None, "internal_error")
_ERROR_503 = _error(
    "mock backend overloaded (fail=503)", "server_error", None, "service_unavailable"
)
_ERROR_HEALTH = _error("mock backend unhealthy", "server_error", None, "internal_error")
_ERROR_404 = _error("Not found", "invalid_request_error", None, "not_found")
_ERROR_405 = _error("Method not allowed", "invalid_request_error", None, "method_not_allowed")
_ERROR_TEMPERATURE = _error(
    "temperature must be <= 2", "invalid_request_error", "temperature", None
)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_body(settings: MockSettings, model: str) -> bytes:
    """A chat.completion JSON with ``_ID`` where the response id goes."""
    completion = settings.completion_tokens
    if completion is None:
        completion = NON_STREAM_COMPLETION_TOKENS
    return json.dumps(
        {
            "id": f"chatcmpl-{_ID}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Hello from {settings.name}"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(settings.prompt_tokens, completion),
        }
    ).encode("utf-8")


def stream_piece(name: str, index: int) -> str:
    """The content delta of stream event ``index`` (0-based) from a backend called ``name``.

    The first three spell ``Hello from <name>``; later ones are `` #<index>``.
    """
    if index == 0:
        return "Hello"
    if index == 1:
        return " from"
    if index == 2:
        return f" {name}"
    return f" #{index}"


class _ChunkMaker:
    """Builds ``chat.completion.chunk`` events (with ``_ID`` in place of the stream id)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": f"chatcmpl-{_ID}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"

    def role(self) -> bytes:
        return self.event(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def content(self, text: str) -> bytes:
        return self.event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def finish(self) -> bytes:
        return self.event([{"index": 0, "delta": {}, "finish_reason": "stop"}])


def _stream_events(settings: MockSettings, model: str, include_usage: bool) -> list[bytes]:
    """Every event of a normal stream, ``[DONE]`` included, with ``_ID`` placeholders."""
    maker = _ChunkMaker(model)
    n = settings.stream_chunks
    events = [maker.role()]
    events.extend(maker.content(stream_piece(settings.name, i)) for i in range(n))
    events.append(maker.finish())
    if include_usage:
        completion = n if settings.completion_tokens is None else settings.completion_tokens
        events.append(maker.event([], usage=_usage(settings.prompt_tokens, completion)))
    events.append(_DONE)
    return events


def _endless_events(name: str, model: str) -> Iterator[bytes]:
    maker = _ChunkMaker(model)
    yield maker.role()
    for i in itertools.count():
        yield maker.content(stream_piece(name, i))


def _check_chat_body(body: object, models: list[str]) -> tuple[int, bytes] | None:
    """Validate a chat request body; return (status, error body) if it must be refused."""
    if not isinstance(body, dict):
        return 400, _error(
            "The request body must be a JSON object.", "invalid_request_error", None, None
        )
    model = body.get("model")
    if not isinstance(model, str):
        return 400, _error(
            "'model' is required and must be a string.", "invalid_request_error", "model", None
        )
    if not isinstance(body.get("messages"), list):
        return 400, _error(
            "'messages' is required and must be a list.", "invalid_request_error", "messages", None
        )
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 2:
        return 400, _ERROR_TEMPERATURE
    if model not in models:
        return 404, _error(
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return None


# -- HTTP ------------------------------------------------------------------------------------


class _MockRequest(server.Request):
    """A request that reports the end of a chat request to the backend, however it ends.

    Finishing and losing the connection both pass through here, so the in-flight, completed
    and disconnect counts need no per-request Deferred, and a pending timer (latency, next
    stream event, reset) is cancelled the moment the client goes away.
    """

    mock_backend: MockBackend | None = None
    mock_timer: DelayedCallLike | None = None
    # Set when the mock itself cuts the connection, so that is not counted as a client leaving.
    mock_closing: bool = False

    def finish(self) -> None:
        """Finish the response and count the chat request as completed."""
        super().finish()
        backend = self.mock_backend
        if backend is not None:
            self.mock_backend = None
            backend._chat_ended(self, COMPLETED)

    def connectionLost(self, reason: Failure) -> None:
        """Cancel any pending timer and count the chat request as cut off."""
        super().connectionLost(reason)
        timer = self.mock_timer
        if timer is not None:
            self.mock_timer = None
            if timer.active():
                timer.cancel()
        backend = self.mock_backend
        if backend is not None:
            self.mock_backend = None
            backend._chat_ended(self, ABORTED if self.mock_closing else DISCONNECTED)


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
        # A hop-by-hop header the gateway must strip. addRawHeader keeps a "close" that
        # Twisted may already have set, so clients still see that the connection ends.
        headers.addRawHeader(b"connection", _HOP_NAME)
        headers.setRawHeaders(_HOP_NAME, [_HOP_VALUE])
        methods = self.routes.get(request.path)
        if methods is None:
            return _not_found(request)
        handler = methods.get(request.method)
        if handler is None:
            request.responseHeaders.setRawHeaders(b"allow", [b", ".join(methods)])
            return _answer(request, 405, _ERROR_405)
        return handler(request)


def _not_found(request: server.Request) -> bytes:
    return _answer(request, 404, _ERROR_404)


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


def _start_stream(request: _MockRequest) -> None:
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [_SSE])
    headers.setRawHeaders(b"cache-control", [_NO_CACHE])


def _nothing(request: _MockRequest) -> None:
    """Leave the request open, saying nothing (hang, stall)."""


def _huge_length(request: _MockRequest) -> None:
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [_JSON])
    headers.setRawHeaders(b"content-length", [b"%d" % HUGE_LENGTH])
    request.write(b'{"id": "chatcmpl-')


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


class MockBackend:
    """One fake inference server: its settings, its counters and its HTTP resource tree.

    ``resource`` is the root ``Resource``; ``site`` the ``Site`` serving it; after ``listen``,
    ``port`` and ``url`` say where it is.
    """

    def __init__(self, settings: MockSettings | None = None, reactor: ReactorLike | None = None):
        self.settings = settings if settings is not None else MockSettings()
        self.reactor: ReactorLike = reactor if reactor is not None else _default_reactor()
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

        ``disconnects`` counts chat requests whose client left before the response ended;
        ``aborted`` those the mock cut off itself (reset, truncated, ``stop``).
        """
        last: dict[str, Any] | None = None
        if self._last_request is not None:
            body, headers = self._last_request
            last = {
                "body": body,
                "headers": {
                    name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
                    for name, values in headers.getAllRawHeaders()
                },
            }
        return {
            "chat_requests": self.chat_requests,
            "in_flight": len(self._in_flight),
            "completed": self.completed,
            "disconnects": self.disconnects,
            "aborted": self.aborted,
            "health_checks": self.health_checks,
            "connections": self.site.connections,
            "open_connections": len(self.site.open),
            "last_request": last,
        }

    def reset(self) -> None:
        """Zero the counters and forget the last request (settings are kept)."""
        self._reset_counters()
        self.site.connections = 0

    # -- internals -------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self.chat_requests = 0
        self.completed = 0
        self.disconnects = 0
        self.aborted = 0
        self.health_checks = 0
        self._last_request: tuple[Any, Any] | None = None

    def _chat_ended(self, request: _MockRequest, outcome: str) -> None:
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

    # -- chat ------------------------------------------------------------------------------

    def _chat(self, request: _MockRequest) -> object:
        self.chat_requests += 1
        n = next(self._ids)
        request.mock_backend = self
        self._in_flight.add(request)
        raw = _read(request)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self._last_request = (body, request.requestHeaders)
        settings = self.settings
        stream = isinstance(body, dict) and body.get("stream") is True
        fail = settings.fail
        if fail is not None and settings.fail_count == 0:
            settings.fail, settings.fail_count = None, -1
        elif fail is not None:
            if settings.fail_count > 0:
                settings.fail_count -= 1
                if settings.fail_count == 0:
                    # This request is the last one the failure applies to.
                    settings.fail, settings.fail_count = None, -1
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str):
                model = settings.models[0] if settings.models else "mock-model"
            action = self._failure(fail, stream, model, n)
            return self._later(request, settings.latency_ms, action)
        refused = _check_chat_body(body, settings.models)
        if refused is not None:
            status, error = refused
            return self._later(
                request, settings.latency_ms, partial(_send, status=status, body=error)
            )
        model = body["model"]
        if stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            events = self._stream(model, usage, n)
            play = partial(self._play, events=events, index=0, end=_finish)
            return self._later(request, settings.latency_ms, play)
        key = (model, settings.name, settings.prompt_tokens, settings.completion_tokens)
        template = self._bodies.get(key)
        if template is None:
            if len(self._bodies) > 1000:
                self._bodies.clear()
            template = self._bodies[key] = _completion_body(settings, model)
        payload = template.replace(_ID_BYTES, b"%d" % n)
        if settings.latency_ms > 0:
            return self._later(
                request, settings.latency_ms, partial(_send, status=200, body=payload)
            )
        # The hot path: Twisted sets Content-Length, writes and finishes.
        request.responseHeaders.setRawHeaders(b"content-type", [_JSON])
        return payload

    def _stream(self, model: str, usage: bool, n: int) -> list[bytes]:
        s = self.settings
        key = (model, usage, s.name, s.stream_chunks, s.prompt_tokens, s.completion_tokens)
        events = self._streams.get(key)
        if events is None:
            if len(self._streams) > 1000:
                self._streams.clear()
            events = self._streams[key] = _stream_events(s, model, usage)
        stream_id = b"%d" % n
        return [e.replace(_ID_BYTES, stream_id) for e in events]

    def _play(
        self,
        request: _MockRequest,
        events: list[bytes],
        index: int,
        end: Callable[[_MockRequest], None],
    ) -> None:
        """Write ``events[index:]`` one write each, ``stream_delay_ms`` apart, then ``end``."""
        request.mock_timer = None
        if index == 0:
            _start_stream(request)
        delay = self.settings.stream_delay_ms
        if delay <= 0:
            for event in events[index:]:
                request.write(event)
            end(request)
            return
        request.write(events[index])
        if index + 1 < len(events):
            request.mock_timer = self.reactor.callLater(
                delay / 1000.0, self._play, request, events, index + 1, end
            )
        else:
            end(request)

    def _endless(self, request: _MockRequest, events: Iterator[bytes]) -> None:
        request.mock_timer = None
        request.write(next(events))
        delay = max(self.settings.stream_delay_ms, 1.0) / 1000.0
        request.mock_timer = self.reactor.callLater(delay, self._endless, request, events)

    def _failure(self, mode: str, stream: bool, model: str, n: int) -> Handler:
        """The action that answers one chat request in failure ``mode``."""
        if mode == "500":
            return partial(_send, status=500, body=_ERROR_500)
        if mode == "503":
            return partial(_send, status=503, body=_ERROR_503)
        if mode == "hang":
            return _nothing
        if mode == "invalid_json":
            return partial(_send, status=200, body=b"not json{")
        if mode == "huge_length":
            return _huge_length
        if mode == "endless":
            if stream:
                return partial(self._endless_stream, model=model)
            return self._endless_json
        body = _completion_body(self.settings, model).replace(_ID_BYTES, b"%d" % n)
        events = self._stream(model, False, n) if stream else []
        if mode == "reset":
            if stream:
                return partial(self._play, events=events[:1], index=0, end=self._abort_soon)
            return partial(self._partial, body=body, end=self._abort_soon)
        if mode == "stall":
            if stream:
                return partial(self._play, events=events[:2], index=0, end=_nothing)
            return partial(self._partial, body=body, end=_nothing)
        if mode == "truncated_sse":
            if stream:
                return partial(self._truncated_stream, events=[events[0], _HALF_EVENT])
            return partial(self._partial, body=body, end=_close)
        raise AssertionError(f"unhandled fail mode {mode!r}")

    @staticmethod
    def _partial(request: _MockRequest, body: bytes, end: Callable[[_MockRequest], None]) -> None:
        """Announce ``body`` in full but write only its first half, then ``end``."""
        request.setResponseCode(200)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [_JSON])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body[: len(body) // 2])
        end(request)

    def _truncated_stream(self, request: _MockRequest, events: list[bytes]) -> None:
        # Tell the client the connection ends here, so no pool reuses it.
        request.responseHeaders.addRawHeader(b"connection", b"close")
        self._play(request, events, 0, _finish_close)

    def _endless_stream(self, request: _MockRequest, model: str) -> None:
        _start_stream(request)
        self._endless(request, _endless_events(self.settings.name, model))

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
            action = partial(_send, status=500, body=_ERROR_HEALTH)
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
            error = _error("The body must be a JSON object of settings.", "invalid_request_error")
            return _answer(request, 400, error)
        try:
            self.configure(**changes)
        except KeyError as e:
            return _answer(request, 400, _error(e.args[0], "invalid_request_error"))
        except (ValueError, TypeError) as e:
            return _answer(request, 400, _error(str(e), "invalid_request_error"))
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


# -- twistd ----------------------------------------------------------------------------------


class MockService(service.Service):
    """Runs one ``MockBackend`` on a TCP port while the service runs."""

    _log = Logger()

    def __init__(self, backend: MockBackend, port: int, interface: str) -> None:
        self.backend = backend
        self.port_number = port
        self.interface = interface

    def startService(self) -> None:
        """Listen (synchronously, so a busy port stops ``twistd`` at start-up) and log the URL."""
        self.backend.listen(self.port_number, self.interface)
        super().startService()
        s = self.backend.settings
        self._log.info(
            "nexus-mock {name} ({type}, models {models}) listening on {url}",
            name=s.name,
            type=s.type,
            models=",".join(s.models),
            url=self.backend.url,
        )

    def stopService(self) -> Deferred[None]:
        """Stop listening and cut open connections."""
        super().stopService()
        return self.backend.stop()


class Options(usage.Options):
    """``twistd nexus-mock`` options."""

    synopsis = "[options]"
    longdesc = "A fake OpenAI / Ollama / llama.cpp inference server for testing Nexus."

    optParameters = [
        ["port", "p", 9001, "TCP port to listen on (0 picks a free one).", int],
        ["interface", "i", "127.0.0.1", "Interface to listen on."],
        ["name", None, "mock", "Backend name (x-mock-backend header, answer text)."],
        ["models", None, "mock-model", "Comma-separated model names."],
        ["type", None, "openai", f"Server type: {'|'.join(BACKEND_TYPES)}."],
        ["latency-ms", None, 0.0, "Delay before chat response headers (ms).", float],
        ["stream-chunks", None, 5, "Content events per stream.", int],
        ["stream-delay-ms", None, 0.0, "Gap between stream events (ms).", float],
        ["fail", None, None, f"Failure mode: {'|'.join(FAIL_MODES)}."],
        ["fail-count", None, -1, "Chat requests the failure applies to (-1 = all).", int],
    ]
    optFlags = [
        ["health-fail", None, "Discovery/health endpoints answer 500."],
        ["flap", None, "Discovery/health endpoints alternate success and 500."],
    ]

    def postOptions(self) -> None:
        """Build ``self["settings"]``, turning any invalid value into a UsageError."""
        models = [m.strip() for m in self["models"].split(",") if m.strip()]
        try:
            self["settings"] = MockSettings(
                name=self["name"],
                models=models,
                type=self["type"],
                latency_ms=self["latency-ms"],
                stream_chunks=self["stream-chunks"],
                stream_delay_ms=self["stream-delay-ms"],
                fail=self["fail"],
                fail_count=self["fail-count"],
                health_fail=bool(self["health-fail"]),
                flap=bool(self["flap"]),
            )
        except ValueError as e:
            # Validator messages start with the setting's name: show it as the option.
            name, _, rest = str(e).partition(" ")
            raise usage.UsageError(f"--{name.replace('_', '-')} {rest}") from None
        if not models:
            raise usage.UsageError("--models needs at least one model name")
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be 0..65535, got {self['port']}")


def makeService(
    options: usage.Options | dict[str, Any], reactor: ReactorLike | None = None
) -> MockService:
    """The ``twistd nexus-mock`` service: one mock backend on ``--interface:--port``."""
    settings = options["settings"] if "settings" in options else MockSettings()
    backend = MockBackend(settings, reactor)
    return MockService(backend, int(options["port"]), str(options["interface"]))
