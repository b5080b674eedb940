"""Real gateways and real mock backends on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

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


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll ``condition`` every 10 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await deferLater(reactor, 0.01, lambda: None)


def start_mock(name: str, models: Sequence[str] = ("m",), **knobs: Any) -> MockBackend:
    """A mock backend on a free port of 127.0.0.1."""
    return listen_mock(reactor, MockSettings(name=name, models=list(models), **knobs))


@attrs.define
class RunningGateway:
    """A gateway listening on a free port of 127.0.0.1, with a client for it."""

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

    async def stream_then_leave(self, model: str, events: int = 3) -> None:
        """Open a stream, read ``events`` events, then close the connection (a client leaving)."""
        response = await self.client.post(
            self.url + "/v1/chat/completions",
            data=json.dumps({"model": model, "messages": [], "stream": True}).encode(),
            unbuffered=True,
        )
        assert response.code == 200
        chunks: list[bytes] = []
        treq.collect(response, chunks.append).addErrback(lambda _: None)
        await wait_for(lambda: b"".join(chunks).count(b"data: ") >= events, what="some events")
        response.original._transport.loseConnection()

    async def get_json(self, path: str, status: int = 200) -> Any:
        response = await self.client.get(self.url + path)
        assert response.code == status, (path, response.code)
        return json.loads(await response.content())

    def sample(self, name: str, **labels: str) -> float:
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
) -> RunningGateway:
    """Build a gateway for the given mocks, listen, and run one health round."""
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
        ),
        health_check=health or HealthCheckConfig(timeout_seconds=2.0),
        routing=routing or RoutingConfig(),
        backends=tuple(configs),
    )
    gateway = build_gateway(config, reactor, environ={"TEST_BACKEND_KEY": "backend-secret"})
    port = reactor.listenTCP(0, gateway.site, backlog=1024, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool))
    running = RunningGateway(gateway, port, client, pool)
    if check:
        await running.check_health()
    return running


def as_deferred(coro: Awaitable[Any]) -> Deferred[Any]:
    return ensureDeferred(coro)  # type: ignore[arg-type]


class Cleanup(list[Any]):
    """Things with a ``stop()`` to call (in reverse order) when a test ends."""

    async def stop_all(self) -> None:
        for item in reversed(self):
            result = item.stop()
            if result is not None:
                await result
