"""Forwarding one inference request: validate, route, try candidates, return the outcome.

Data flows one way: the server layer hands an exchange here, the router
picks the candidates, each attempt goes upstream through the shared Agent,
and the answer goes back as an outcome (a ``Reply``, or a ``Stream`` relayed
by ``StreamRelay``) for the server layer to write. Everything learned lands
on the exchange's ``RequestRecord``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from nexus import sse
from nexus.config import BackendConfig
from nexus.endpoints import MISSING_ENDPOINT, Endpoint, json_body
from nexus.errors import (
    BadGateway,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
    UpstreamParseError,
)
from nexus.http_client import RequestHead, Response
from nexus.registry import Backend
from nexus.routing import RouteDecision, Router
from nexus.server import Exchange, Outcome, Reply, Stream
from nexus.tracking import RequestRecord
from nexus.upstream import (
    HOP_BY_HOP,
    Deadline,
    UpstreamClient,
    UpstreamTimeout,
    backend_authorization,
    discard_body,
    read_body,
)

log = Logger()

#: Response headers the gateway sets itself rather than copying from a backend.
_NOT_COPIED = HOP_BY_HOP | {b"content-length", b"date", b"server"}

_JSON = b"application/json"


def requested_model(body: bytes) -> str | None:
    """The ``model`` a request body asks for, or None (never raises)."""
    try:
        model = json.loads(body).get("model")
    except Exception:
        return None
    return model if isinstance(model, str) and model else None


class _AttemptFailed(Exception):
    """One attempt failed in a way that may be retried on the next candidate."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamFailed(Exception):
    """The upstream stream broke before its first event (reset, truncated, idle)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamRelay(Protocol):
    """Relays an upstream SSE body to the client, whole events at a time.

    ``ready`` fires when the first events have arrived (or the stream ended
    cleanly with none), and fails with StreamFailed if the stream broke
    before: until then nothing reached the client, so the attempt can be
    retried elsewhere. ``write_to(consumer)`` then writes what arrived and
    everything after it, with the upstream transport registered as the
    consumer's producer so that a slow client pauses the backend; a break
    after that ends the stream with one error event and ``[DONE]``.

    The end of a body is normal when it falls between events: the backend
    ended its chunked body, or closed a close-delimited body (Twisted's
    ``PotentialDataLoss``) after ``[DONE]``. A close inside an event, or a
    close-delimited body cut before ``[DONE]``, is a broken stream.
    """

    def __init__(
        self,
        record: RequestRecord,
        idle_timeout: float,
        clock: IReactorTime,
        now: Callable[[], float],
    ) -> None:
        self.record = record
        self.now = now
        self.idle_timeout = idle_timeout
        self.framer = sse.SSEFramer()
        self.saw_done = False
        self.ready: Deferred[None] = Deferred(self._cancel)
        self.done: Deferred[None] = Deferred(self._cancel)
        self.consumer: IConsumer | None = None
        self._buffer: list[bytes] = []
        self._want_first_token = True
        self._ended = False
        self._error: GatewayError | None = None
        self._registered = False
        self._idle = clock.callLater(idle_timeout, self._on_idle)

    # -- the upstream side -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        self._idle.reset(self.idle_timeout)
        try:
            events = self.framer.feed(data)
        except sse.EventTooLarge as e:
            self._fail(BadGateway(f"Backend stream broken: {e}"))
            return
        if not events:
            return
        record = self.record
        for event in events:
            if self._want_first_token and sse.has_content(event):
                self._want_first_token = False
                record.time_to_first_token = self.now() - record.started
            if sse.is_done(event):
                self.saw_done = True
            usage = sse.usage_of(event)
            if usage is not None:
                record.set_usage(*usage)
        if self.consumer is None:
            self._buffer.extend(events)
            if not self.ready.called:
                self.ready.callback(None)
            return
        self.consumer.write(b"".join(events) if len(events) > 1 else events[0])

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._ended:
            self._unregister()
            return
        cut_inside_event = bool(self.framer.pending.strip())
        if reason.check(ResponseDone) and not cut_inside_event:
            self._end(None)
        elif reason.check(PotentialDataLoss) and not cut_inside_event and self.saw_done:
            self._end(None)  # a close-delimited body, ended after [DONE]
        elif reason.check(ResponseDone, PotentialDataLoss) and cut_inside_event:
            self._end(BadGateway("The backend's stream ended inside an event."))
        else:
            self._end(BadGateway("The backend's stream broke off."))

    def _on_idle(self) -> None:
        self._fail(GatewayTimeout("The backend stopped sending events."))

    def _fail(self, error: GatewayError) -> None:
        self._end(error)
        self._stop_upstream()

    def _end(self, error: GatewayError | None) -> None:
        """The upstream body is over (``error`` None: cleanly)."""
        if self._ended:
            return
        self._ended = True
        if self._idle.active():
            self._idle.cancel()
        if not self.ready.called:
            if error is not None:
                self.ready.errback(StreamFailed(error))
                return
            self.ready.callback(None)
        self._error = error
        if self.consumer is not None:
            self._finish_output()

    # -- the client side ---------------------------------------------------------

    def write_to(self, consumer: IConsumer) -> Deferred[None]:
        """Write the events so far and the rest as they come; fires when the stream is over."""
        self.consumer = consumer
        if not self._ended and self.transport is not None:
            consumer.registerProducer(self.transport, True)  # type: ignore[arg-type]
            self._registered = True
        if self._buffer:
            consumer.write(b"".join(self._buffer))
            self._buffer = []
        if self._ended:
            self._finish_output()
        return self.done

    def stop(self) -> None:
        """Drop the stream: the client is gone before it was written."""
        self.done.addErrback(lambda failure: failure.trap(CancelledError))
        self.done.cancel()

    def _finish_output(self) -> None:
        self._unregister()
        consumer = self.consumer
        assert consumer is not None
        if self._error is not None:
            # The 200 is out: end the stream with one error event, then [DONE].
            self.record.error_type = self._error.error_type
            self.record.error_message = self._error.message
            consumer.write(sse.error_event(self._error.to_json()) + sse.DONE_EVENT)
        elif not self.saw_done:
            consumer.write(sse.DONE_EVENT)
        if not self.done.called:
            self.done.callback(None)

    def _cancel(self, _: Deferred[None]) -> None:
        self._ended = True
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
            consumer: Any = self.consumer
            # A request whose client disconnected first has no channel to unregister from.
            if getattr(consumer, "channel", True) is not None:
                consumer.unregisterProducer()


@attrs.frozen
class _Target:
    """What every request to one backend endpoint shares: its request head and id header.

    The backend's bearer header, when it has its own key, is in the head.
    """

    head: RequestHead
    backend_header: tuple[bytes, Sequence[bytes]]

    @classmethod
    def for_backend(
        cls,
        backend: Backend,
        endpoint: Endpoint,
        upstream: UpstreamClient,
        environ: Mapping[str, str],
    ) -> _Target:
        url = backend.config.url.encode("ascii") + endpoint.path
        headers = [(b"Content-Type", _JSON)]
        authorization = backend_authorization(backend.config, environ)
        if authorization is not None:
            headers.append((b"Authorization", authorization))
        backend_header = (b"x-nexus-backend", [backend.name.encode("utf-8")])
        return cls(upstream.request_head(url, headers), backend_header)


class _Lease:
    """One attempt's hold on a backend: counted pending until released, once."""

    __slots__ = ("backend", "now", "released", "started")

    def __init__(self, backend: Backend, now: Callable[[], float]) -> None:
        self.backend = backend
        self.now = now
        self.started = now()
        self.released = False
        backend.pending += 1

    def release(self, result: object = None) -> object:
        if not self.released:
            self.released = True
            self.backend.pending -= 1
            self.backend.record_latency((self.now() - self.started) * 1000.0)
        return result


class _EndpointMissing(Exception):
    """The backend answered 404, 405 or 501 for an optional endpoint: it lacks it."""


class InferenceProxy:
    """Serves every inference endpoint: an exchange in, an outcome out.

    Validate the body for its endpoint, route, try the candidates (skipping a
    backend that lacks an optional endpoint, and remembering that until its
    next successful model discovery), and return the answer as an outcome.
    """

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
        content_preview: bool = False,
    ) -> None:
        #: Keep the start of the last user message on the record (``[logging] content_preview``).
        self.content_preview = content_preview
        self.router = router
        self.upstream = upstream
        self.connections = upstream.connections
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.max_retries = max_retries
        self.now = now
        self.environ = environ
        #: (backend id, endpoint) -> (the backend config it was built from, target).
        self._targets: dict[tuple[str, str], tuple[BackendConfig, _Target]] = {}

    def forget_targets(self) -> None:
        """Drop the per-backend request templates (a reload may change urls and keys)."""
        self._targets.clear()

    def _target(self, backend: Backend, endpoint: Endpoint) -> _Target:
        key = (backend.name, endpoint.name)
        cached = self._targets.get(key)
        # A backend removed and added again under its id (mDNS) may have another url.
        if cached is not None and cached[0] is backend.config:
            return cached[1]
        target = _Target.for_backend(backend, endpoint, self.upstream, self.environ)
        self._targets[key] = (backend.config, target)
        return target

    async def handle(self, exchange: Exchange, endpoint: Endpoint) -> Outcome:
        """Answer one request to ``endpoint``; a failure before any answer is a GatewayError."""
        deadline = self.now() + self.request_timeout
        record = exchange.record
        record.endpoint = endpoint.name
        body = exchange.body
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes.")
        payload = endpoint.parse(body)
        requested = payload["model"]
        record.model = requested
        record.stream = stream = endpoint.streams and payload.get("stream") is True
        if self.content_preview:
            record.prompt_preview = prompt_preview(payload)
        decision = self.router.decide(requested, endpoint.needs(payload))
        record.actual_model = decision.model
        record.route_reason = decision.route_reason
        if decision.fallback_from is not None:
            record.fallback_from = decision.fallback_from
            record.fallback_to = decision.model
        if decision.model != requested:
            payload["model"] = decision.model
            # ASCII-escaped: a lone surrogate from the client survives re-encoding.
            body = json.dumps(payload).encode("utf-8")
        candidates = decision.candidates
        if endpoint.optional:
            # Backends known to lack the endpoint go last... or not at all, when others exist.
            candidates = tuple(
                b for b in candidates if endpoint.name not in b.missing_endpoints
            ) or candidates
        call = _Call(
            endpoint, decision, candidates, body, stream, exchange.authorization,
            record.request_id.encode("ascii"),
        )
        return await self._forward(record, call, deadline)

    async def _forward(self, record: RequestRecord, call: _Call, deadline: float) -> Outcome:
        last: GatewayError | None = None
        failed_on: list[str] = []
        attempts_left = 1 + self.max_retries  # a backend lacking the endpoint costs none
        candidates = call.candidates
        for index, backend in enumerate(candidates):
            if attempts_left == 0:
                break
            remaining = deadline - self.now()
            if remaining <= 0:
                last = GatewayTimeout("The request timed out.")
                break
            record.backend = backend.name
            record.backend_type = backend.type
            record.attempts += 1
            if failed_on:
                record.route_reason = (
                    f"{call.decision.route_reason}; retry {len(failed_on)} on {backend.name}"
                    f" after {', '.join(failed_on)} failed"
                )
            lease = _Lease(backend, self.now)
            timer = Deadline(self.clock, remaining)
            can_skip = index < len(candidates) - 1
            try:
                outcome = await self._attempt(record, call, backend, timer, lease, can_skip)
            except _EndpointMissing:
                lease.release()
                backend.missing_endpoints.add(call.endpoint.name)
                failed_on.append(backend.name)
                log.info(
                    "request {request_id}: {backend} lacks {path}; trying the next backend",
                    request_id=record.request_id,
                    backend=backend.name,
                    path=call.endpoint.path.decode(),
                )
                continue
            except _AttemptFailed as failed:
                lease.release()
                if record.client_gone:
                    # The Agent reports a cancelled attempt as a failure: do not
                    # retry for a client that has left.
                    raise CancelledError() from None
                last = failed.error
                failed_on.append(backend.name)
                attempts_left -= 1
                log.info(
                    "request {request_id}: attempt on {backend} failed: {why}",
                    request_id=record.request_id,
                    backend=backend.name,
                    why=last.message,
                )
                continue
            except BaseException:
                lease.release()
                raise
            finally:
                timer.cancel()
            if isinstance(outcome, Reply):
                lease.release()
            return outcome
        error = last or BadGateway("No backend could be tried.")
        if failed_on:
            record.route_reason = (
                f"{call.decision.route_reason}; all {len(failed_on)} attempts failed"
            )
        headers = [(b"x-nexus-backend", [(record.backend or "none").encode()])]
        if record.route_reason:
            headers.append((b"x-nexus-route-reason", [header_text(record.route_reason)]))
        return Reply.error(error, headers)

    async def _attempt(
        self,
        record: RequestRecord,
        call: _Call,
        backend: Backend,
        timer: Deadline,
        lease: _Lease,
        can_skip: bool,
    ) -> Outcome:
        target = self._target(backend, call.endpoint)
        head = target.head
        try:
            response: Response = await timer.watch(
                self.connections.request(
                    head.origin, head.build(call.body, call.request_id, call.authorization)
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
        # A backend lacking an optional endpoint: the next candidate, or, when it is the
        # last, its answer passed through like a backend's 4xx (even a 501).
        lacks_endpoint = call.endpoint.optional and code in MISSING_ENDPOINT
        if lacks_endpoint and can_skip:
            discard_body(response)
            raise _EndpointMissing()
        if code >= 500 and not lacks_endpoint:
            discard_body(response)
            raise _AttemptFailed(BadGateway(f"Backend '{backend.name}' answered {code}."))
        # A backend that answers a stream request with plain JSON is read as JSON.
        if call.stream and code == 200 and not _is_json(response):
            timer.cancel()  # from here the relay's idle timeout applies
            relay = StreamRelay(record, self.request_timeout, self.clock, self.now)
            response.deliverBody(relay)
            try:
                await relay.ready
            except StreamFailed as failed:
                raise _AttemptFailed(failed.error) from None
            relay.done.addBoth(lease.release)  # the backend is busy until the relay is over
            headers = [*_relayed_headers(response, target, record), *_SSE_HEADERS]
            return Stream(200, headers, relay)
        data = response.complete_body()
        try:
            if data is None:
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
        error_type = error_message = None
        if 200 <= code < 300:
            try:
                answer = json_body(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise _AttemptFailed(
                    UpstreamParseError(f"Backend '{backend.name}' answered invalid JSON.")
                ) from None
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(usage, dict):
                record.set_usage(_count(usage.get("prompt_tokens")),
                                 _count(usage.get("completion_tokens")))
        else:
            error_type = "invalid_request"  # the backend's own 4xx, passed through
            error_message = _backend_error_message(backend, code, data)
        headers = _relayed_headers(response, target, record)
        return Reply(code, data, headers, error_type, error_message)


@attrs.frozen
class _Call:
    """What every attempt of one request sends: the route, the body, the mode, the key."""

    endpoint: Endpoint
    decision: RouteDecision
    candidates: tuple[Backend, ...]
    body: bytes
    stream: bool
    authorization: list[bytes] | None
    request_id: bytes


_SSE_HEADERS: tuple[tuple[bytes, Sequence[bytes]], ...] = (
    (b"content-type", [b"text/event-stream"]),
    (b"cache-control", [b"no-cache"]),
)


def _relayed_headers(
    response: Response, target: _Target, record: RequestRecord
) -> list[tuple[bytes, Sequence[bytes]]]:
    """The backend's response headers a client gets, plus the gateway's own.

    Hop-by-hop headers are dropped: the standard set and every name the
    backend listed in its ``Connection`` header.
    """
    skip = response.connection_names
    headers: list[tuple[bytes, Sequence[bytes]]] = [
        (name, values)
        for name, values in response.headers.items()
        if name not in _NOT_COPIED and name not in skip
    ]
    headers.append(target.backend_header)
    if record.route_reason:
        headers.append((b"x-nexus-route-reason", [header_text(record.route_reason)]))
    if record.fallback_to is not None:
        headers.append((b"x-nexus-fallback-model", [record.fallback_to.encode("utf-8")]))
    return headers


def header_text(text: str) -> bytes:
    """``text`` as a header value: ASCII, non-ASCII escaped, no control characters."""
    return _NOT_PRINTABLE.sub(b" ", text.encode("ascii", "backslashreplace"))


_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")


def _backend_error_message(backend: Backend, code: int, body: bytes) -> str:
    """The message of a backend's own error answer (OpenAI shape), else its status."""
    message: Any
    try:
        message = json.loads(body)["error"]["message"]
    except Exception:
        message = None
    if isinstance(message, str) and message:
        return f"Backend '{backend.name}' answered {code}: {message[:200]}"
    return f"Backend '{backend.name}' answered {code}."


def prompt_preview(payload: Mapping[str, Any], size: int = 100) -> str | None:
    """The first ``size`` characters of the last user message's text, if any."""
    messages: Any = payload.get("messages")
    message: Any
    content: Any
    for message in reversed(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                part["text"] for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        return content[:size] if isinstance(content, str) else None
    return None


def _is_json(response: Response) -> bool:
    content_type = response.header(b"content-type") or b""
    return content_type.split(b";")[0].strip().lower() == _JSON


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
