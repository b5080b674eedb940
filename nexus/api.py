"""The HTTP API (contract section 1): Klein routes over the gateway's parts.

Klein is the routing layer only; the work happens in ``nexus.proxy``,
``nexus.metrics`` and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger

from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from nexus.errors import GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from nexus.metrics import MetricsCollector, MetricsResource, StatsResource
from nexus.proxy import ChatCompletions
from nexus.registry import HEALTHY, BackendRegistry
from nexus.routing import Router
from nexus.tracking import RequestRecord, track

log = Logger()

#: Paths whose requests are inference requests, counted in the metrics.
INFERENCE_PATHS = frozenset({b"/v1/chat/completions"})


def _json(request: Any, status: int, payload: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8")


def write_error(request: Any, error: GatewayError) -> bytes:
    """Answer ``error`` as the contract's JSON error body."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    return error.to_json()


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
    ) -> None:
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

    @app.route("/v1/chat/completions", methods=["POST"])
    async def chat_completions(self, request: Any) -> bytes | None:
        """Proxy one chat completion, recorded exactly once whatever happens."""
        record: RequestRecord = track(request, self.collector, self.now)
        try:
            return await self.chat.handle(request, record)
        except GatewayError as error:
            record.error_type = error.error_type
            return write_error(request, error)
        except Exception:
            # A bug must still answer like the contract says and be counted.
            log.failure("unexpected error serving a chat completion")
            record.error_type = "other"
            return write_error(request, GatewayError("Internal gateway error."))

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: Any) -> bytes:
        """Models servable now, plus aliases whose target is servable."""
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
        return self.metrics_resource

    @app.route("/v1/stats", methods=["GET", "HEAD"])
    def stats(self, request: Any) -> Any:
        """The same numbers as JSON."""
        return self.stats_resource

    @app.handle_errors(WerkzeugNotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return write_error(request, NotFound(f"Unknown path: {path}"))

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def method_not_allowed(self, request: Any, failure: Any) -> bytes:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        return write_error(request, MethodNotAllowed(f"{method} is not allowed on {path}"))


class NexusRequest(Request):
    """A request that refuses an oversized body before reading it.

    As soon as the declared length (or, for a chunked body, the bytes received
    so far) exceeds ``site.max_body_bytes``, the gateway answers 413 and closes
    the connection instead of buffering the rest.
    """

    _rejected = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            self._reject_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def _reject_too_large(self) -> None:
        self._rejected = True
        channel = self.channel
        site = channel.site
        error = PayloadTooLarge(f"The request body exceeds {site.max_body_bytes} bytes.")
        body = error.to_json()
        channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        channel.transport.loseConnection()
        path = getattr(channel, "_path", b"").split(b"?", 1)[0]
        if path in INFERENCE_PATHS and site.collector is not None:
            record = RequestRecord(started=site.now())
            record.error_type = error.error_type
            record.write(site.collector, error.status, site.now())


class NexusSite(Site):
    """The gateway's site: body-size limit, no access log at the default level."""

    requestFactory = NexusRequest

    def __init__(
        self,
        resource: Any,
        max_body_bytes: int,
        collector: MetricsCollector | None,
        now: Callable[[], float],
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.collector = collector
        self.now = now
        self.noisy = False

    def log(self, request: Any) -> None:
        """No per-request access log: metrics count requests, logs stay quiet."""
