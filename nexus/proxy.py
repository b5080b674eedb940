"""Forwarding one chat completion: validate, route, try candidates, relay the answer.

Data flows one way: the API hands a request here, the router picks the
candidates, each attempt goes upstream through the shared Agent, and
everything learned lands on the request's ``RequestRecord``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from nexus import sse
from nexus.errors import (
    BadGateway,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    UpstreamParseError,
)
from nexus.registry import Backend
from nexus.routing import RouteDecision, Router, request_needs
from nexus.tracking import RequestRecord
from nexus.upstream import (
    HOP_BY_HOP,
    BytesProducer,
    Deadline,
    UpstreamClient,
    UpstreamTimeout,
    discard_body,
    read_body,
)

log = Logger()

#: Response headers the gateway sets itself rather than copying from a backend.
_NOT_COPIED = HOP_BY_HOP | {b"content-length", b"date", b"server"}

_JSON = b"application/json"


def parse_chat_request(body: bytes) -> dict[str, Any]:
    """Decode and check a chat completion body; raise InvalidRequest with the reason."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.", "model")
    if not isinstance(payload.get("messages"), list):
        raise InvalidRequest("'messages' is required and must be a list.", "messages")
    return payload


class _AttemptFailed(Exception):
    """One attempt failed in a way that may be retried on the next candidate."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamFailed(Exception):
    """The upstream stream broke (reset, truncated event, idle timeout)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamRelay(Protocol):
    """Relays an upstream SSE body to the client, whole events at a time.

    The upstream transport is registered as the client request's producer, so
    a client that reads slowly pauses the read from the backend. ``done``
    fires when the upstream ends cleanly and fails with StreamFailed
    otherwise; cancelling it stops the upstream at once. ``start`` is called
    right before the first byte goes to the client, so an attempt that fails
    earlier can still be retried elsewhere.
    """

    def __init__(
        self,
        request: Any,
        record: RequestRecord,
        start: Callable[[], None],
        idle_timeout: float,
        clock: IReactorTime,
        now: Callable[[], float],
    ) -> None:
        self.request = request
        self.record = record
        self.start = start
        self.clock = clock
        self.now = now
        self.idle_timeout = idle_timeout
        self.framer = sse.SSEFramer()
        self.started_output = False
        self.saw_done = False
        self.timed_out = False
        self._want_first_token = True
        self._registered = False
        self.done: Deferred[None] = Deferred(self._cancel)
        self._idle = clock.callLater(idle_timeout, self._on_idle)

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        if self._idle.active():
            self._idle.reset(self.idle_timeout)
        try:
            events = self.framer.feed(data)
        except sse.EventTooLarge as e:
            self._fail(BadGateway(f"Backend stream broken: {e}"))
            return
        if not events:
            return
        for event in events:
            if self._want_first_token and sse.has_content(event):
                self._want_first_token = False
                self.record.time_to_first_token = self.now() - self.record.started
            if sse.is_done(event):
                self.saw_done = True
            usage = sse.usage_of(event)
            if usage is not None:
                self.record.set_usage(*usage)
        if not self.started_output:
            self.started_output = True
            self.start()
        self.request.write(b"".join(events) if len(events) > 1 else events[0])

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._idle.active():
            self._idle.cancel()
        self._unregister()
        if self.done.called:
            return
        if self.timed_out:
            error: GatewayError = GatewayTimeout("The backend stopped sending events.")
        elif reason.check(ResponseDone) and not self.framer.pending.strip():
            self.done.callback(None)
            return
        elif reason.check(ResponseDone):
            error = BadGateway("The backend's stream ended inside an event.")
        else:
            error = BadGateway("The backend's stream broke off.")
        self.done.errback(StreamFailed(error))

    def _fail(self, error: GatewayError) -> None:
        # Release the client's producer slot before the handler resumes and finishes.
        self._stop_upstream()
        if not self.done.called:
            self.done.errback(StreamFailed(error))

    def _on_idle(self) -> None:
        self.timed_out = True
        self._fail(GatewayTimeout("The backend stopped sending events."))

    def _cancel(self, _: Deferred[None]) -> None:
        if self._idle.active():
            self._idle.cancel()
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        self._unregister()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            # The channel is gone when the client disconnected first.
            if self.request.channel is not None:
                self.request.unregisterProducer()


@attrs.frozen
class _Target:
    """What every request to one backend shares: its URL and base headers.

    ``headers`` is never mutated (a request that adds the client's
    ``Authorization`` copies it); it carries ``Host`` so the Agent does not
    copy and recompute it on every request.
    """

    url: bytes
    headers: Headers
    own_key: bool

    @classmethod
    def for_backend(cls, backend: Backend, environ: Mapping[str, str]) -> _Target:
        url = (backend.config.url + "/v1/chat/completions").encode("ascii")
        parsed = URI.fromBytes(url)
        host = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            host += b":%d" % parsed.port
        headers = Headers({b"content-type": [_JSON], b"host": [host]})
        env = backend.config.api_key_env
        key = environ.get(env) if env else None
        if key:
            headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode("latin-1")])
        return cls(url, headers, bool(key))


class ChatCompletions:
    """Serves ``POST /v1/chat/completions`` for the API."""

    def __init__(
        self,
        router: Router,
        upstream: UpstreamClient,
        clock: IReactorTime,
        request_timeout: float,
        max_body_bytes: int,
        max_retries: int,
        now: Callable[[], float],
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.router = router
        self.agent = upstream.agent
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.max_retries = max_retries
        self.now = now
        self.environ = environ
        self._targets: dict[str, _Target] = {}

    def _target(self, backend: Backend) -> _Target:
        target = self._targets.get(backend.name)
        if target is None:
            target = _Target.for_backend(backend, self.environ)
            self._targets[backend.name] = target
        return target

    def _headers(self, target: _Target, authorization: list[bytes] | None) -> Headers:
        if target.own_key or not authorization:
            return target.headers
        headers = target.headers.copy()
        headers.setRawHeaders(b"authorization", authorization)
        return headers

    async def handle(self, request: Any, record: RequestRecord) -> bytes | None:
        """Answer one request; every failure comes back as a GatewayError."""
        deadline = self.now() + self.request_timeout
        body = request.content.read() if request.content is not None else b""
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes.")
        payload = parse_chat_request(body)
        requested = payload["model"]
        record.model = requested
        decision = self.router.decide(requested, request_needs(payload))
        if decision.fallback_from is not None:
            record.fallback_from = decision.fallback_from
            record.fallback_to = decision.model
        if decision.model != requested:
            payload["model"] = decision.model
            # ASCII-escaped: a lone surrogate from the client survives re-encoding.
            body = json.dumps(payload).encode("utf-8")
        stream = payload.get("stream") is True
        authorization = request.requestHeaders.getRawHeaders(b"authorization")
        return await self._forward(request, record, decision, body, stream, authorization, deadline)

    async def _forward(
        self,
        request: Any,
        record: RequestRecord,
        decision: RouteDecision,
        body: bytes,
        stream: bool,
        authorization: list[bytes] | None,
        deadline: float,
    ) -> bytes | None:
        last: GatewayError | None = None
        for backend in decision.candidates[: 1 + self.max_retries]:
            remaining = deadline - self.now()
            if remaining <= 0:
                last = GatewayTimeout("The request timed out.")
                break
            record.backend = backend.name
            backend.pending += 1
            started = self.now()
            timer = Deadline(self.clock, remaining)
            try:
                return await self._attempt(
                    request, record, decision, backend, body, stream, authorization, timer
                )
            except _AttemptFailed as failed:
                if record.client_gone:
                    # The Agent reports a cancelled attempt as a failure: do not
                    # retry for a client that has left.
                    raise CancelledError() from None
                last = failed.error
                log.info(
                    "attempt on {backend} failed: {why}", backend=backend.name, why=last.message
                )
            finally:
                timer.cancel()
                backend.pending -= 1
                backend.record_latency((self.now() - started) * 1000.0)
        request.setHeader(b"x-nexus-backend", record.backend or "none")
        raise last or BadGateway("No backend could be tried.")

    async def _attempt(
        self,
        request: Any,
        record: RequestRecord,
        decision: RouteDecision,
        backend: Backend,
        body: bytes,
        stream: bool,
        authorization: list[bytes] | None,
        timer: Deadline,
    ) -> bytes | None:
        try:
            target = self._target(backend)
            response: IResponse = await timer.watch(
                self.agent.request(
                    b"POST", target.url, self._headers(target, authorization), BytesProducer(body)
                )
            )
        except UpstreamTimeout:
            raise _AttemptFailed(
                GatewayTimeout(f"Backend '{backend.name}' sent no response in time.")
            ) from None
        except CancelledError:
            raise
        except Exception as e:
            raise _AttemptFailed(
                BadGateway(f"Backend '{backend.name}' is unreachable ({type(e).__name__}).")
            ) from None
        code = response.code
        if code >= 500:
            discard_body(response)
            raise _AttemptFailed(BadGateway(f"Backend '{backend.name}' answered {code}."))
        # A backend that answers a stream request with plain JSON is read as JSON.
        if stream and code == 200 and not _is_json(response):
            timer.cancel()  # from here the relay's idle timeout applies
            await self._relay(request, record, decision, backend, response)
            return None
        try:
            data = await timer.watch(read_body(response))
        except UpstreamTimeout:
            raise _AttemptFailed(
                GatewayTimeout(f"Backend '{backend.name}' did not finish its answer in time.")
            ) from None
        except CancelledError:
            raise
        except Exception as e:
            raise _AttemptFailed(
                BadGateway(f"Backend '{backend.name}' broke off its answer ({type(e).__name__}).")
            ) from None
        if 200 <= code < 300:
            try:
                answer = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise _AttemptFailed(
                    UpstreamParseError(f"Backend '{backend.name}' answered invalid JSON.")
                ) from None
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(usage, dict):
                record.set_usage(_count(usage.get("prompt_tokens")),
                                 _count(usage.get("completion_tokens")))
        else:
            record.error_type = "invalid_request"
        request.setResponseCode(code)
        self._copy_headers(request, response, backend, decision)
        request.setHeader(b"content-length", b"%d" % len(data))
        return data

    async def _relay(
        self,
        request: Any,
        record: RequestRecord,
        decision: RouteDecision,
        backend: Backend,
        response: IResponse,
    ) -> None:
        def start() -> None:
            request.setResponseCode(200)
            self._copy_headers(request, response, backend, decision)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")

        relay = StreamRelay(request, record, start, self.request_timeout, self.clock, self.now)
        response.deliverBody(relay)
        try:
            await relay.done
        except StreamFailed as failed:
            if not relay.started_output:
                raise _AttemptFailed(failed.error) from None
            # The 200 is out: end the stream with one error event, then [DONE].
            record.error_type = failed.error.error_type
            request.write(sse.error_event(failed.error.to_json()) + sse.DONE_EVENT)
            return
        if not relay.started_output:
            start()
        if not relay.saw_done:
            request.write(sse.DONE_EVENT)

    @staticmethod
    def _copy_headers(
        request: Any, response: IResponse, backend: Backend, decision: RouteDecision
    ) -> None:
        # Twisted's client already keeps the connection-control headers (Connection,
        # Keep-Alive, Transfer-Encoding, ...) out of response.headers; _NOT_COPIED
        # covers the remaining hop-by-hop names.
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() in _NOT_COPIED:
                continue
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"x-nexus-backend", backend.name)
        if decision.fallback_from is not None:
            request.setHeader(b"x-nexus-fallback-model", decision.model)


def _is_json(response: IResponse) -> bool:
    types = response.headers.getRawHeaders(b"content-type") or [b""]
    return types[0].split(b";")[0].strip().lower() == _JSON


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
