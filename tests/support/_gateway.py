"""Real gateways and real mock backends on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.web.client import HTTPConnectionPool

from nexus.config import (
    BackendConfig,
    Config,
    HealthCheckConfig,
    RoutingConfig,
    ServerConfig,
)
from nexus.service import Gateway, build_gateway
from nexus.testing import MockBackend, MockSettings, listen_mock
from tests.prometheus_bridge import prometheus_registry
from tests.support._clients import deadline, http_client
from tests.support._polling import wait_for


def start_mock(name: str, models: Sequence[str] = ("m",), **knobs: Any) -> MockBackend:
    """A mock backend on a free port of 127.0.0.1."""
    return listen_mock(reactor, MockSettings(name=name, models=list(models), **knobs))


class StreamedBody(Protocol):
    """Keeps a streamed body; ``leave()`` closes the connection (the client goes away)."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.ended.callback(None)

    def leave(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


@attrs.define
class RunningGateway:
    """A gateway listening on a free port of 127.0.0.1, with a client (with deadlines) for it."""

    gateway: Gateway
    port: Any
    client: HTTPClient
    pool: HTTPConnectionPool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def chat(self, model: str = "m", headers: dict[str, Any] | None = None,
                   **fields: Any) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
        return await self.client.post(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    async def stream_then_leave(
        self,
        model: str,
        events: int = 3,
        path: str = "/v1/chat/completions",
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Open a stream, read ``events`` events, then close the connection (a client leaving)."""
        body = payload or {"model": model, "messages": [], "stream": True}
        response = await self.client.post(
            self.url + path, data=json.dumps(body).encode(), unbuffered=True
        )
        assert response.code == 200
        body = StreamedBody()
        response.deliverBody(body)
        await wait_for(lambda: body.data.count(b"data: ") >= events, what="some events")
        body.leave()
        await deadline(body.ended, what="the connection closing")

    async def get_json(self, path: str, status: int = 200) -> Any:
        response = await self.client.get(self.url + path)
        assert response.code == status, (path, response.code)
        return json.loads(await response.content())

    def sample(self, name: str, **labels: str) -> float:
        self.gateway.site.write_records()  # what every read of the numbers does first
        value = prometheus_registry(self.gateway.collector).get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def check_health(self) -> None:
        await self.gateway.poller.check_all()

    async def stop(self) -> None:
        await maybeDeferred(self.port.stopListening)
        await self.pool.closeCachedConnections()
        await self.gateway.upstream.stopService()


async def start_gateway(
    backends: Sequence[MockBackend | BackendConfig],
    *,
    routing: RoutingConfig | None = None,
    request_timeout: float = 5.0,
    max_body_bytes: int = 10 * 1024 * 1024,
    health: HealthCheckConfig | None = None,
    backend_options: dict[str, dict[str, Any]] | None = None,
    check: bool = True,
    server: dict[str, Any] | None = None,
) -> RunningGateway:
    """Build a gateway for the given mocks, listen, and run one health round.

    ``server``: more ``[server]`` settings (``metrics_token``, ``dashboard``, ...).
    """
    configs = []
    for b in backends:
        if isinstance(b, MockBackend):
            options = (backend_options or {}).get(b.settings.name, {})
            b = BackendConfig(name=b.settings.name, url=b.url, type=b.settings.type, **options)
        configs.append(b)
    config = Config(
        server=ServerConfig(
            listen="tcp:0:interface=127.0.0.1",
            request_timeout_seconds=request_timeout,
            max_body_bytes=max_body_bytes,
            **(server or {}),
        ),
        health_check=health or HealthCheckConfig(timeout_seconds=2.0),
        routing=routing or RoutingConfig(),
        backends=tuple(configs),
    )
    gateway = build_gateway(config, reactor, environ={"TEST_BACKEND_KEY": "backend-secret"})
    port = reactor.listenTCP(0, gateway.site, backlog=1024, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=True)
    running = RunningGateway(gateway, port, http_client(pool), pool)
    if check:
        await running.check_health()
    return running
