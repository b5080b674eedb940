"""Access control, request limits and graceful shutdown, on real sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import ResponseFailed

from nexus.access import AccessPolicy
from nexus.config import BackendConfig, Config, DiscoveryConfig, HealthCheckConfig, ServerConfig
from nexus.service import GatewayService, build_gateway
from tests.prometheus_bridge import prometheus_registry
from tests.support import (
    Cleanup,
    deadline,
    free_port,
    http_client,
    start_gateway,
    start_mock,
    wait_for,
)


def with_policy(gw: Any, **kwargs: Any) -> None:
    gw.gateway.api.access = AccessPolicy(**kwargs)


@pytest_twisted.ensureDeferred
async def test_api_keys_guard_v1_and_never_leak(cleanup: Cleanup) -> None:
    mock = start_mock("a", ["m"])
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    with_policy(gw, api_keys=["sk-right", "sk-other"])
    # a valid key with extra characters (or a prefix of one) is not a valid key
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"},
                    {"Authorization": "Basic sk-right"}, {"Authorization": "Bearer sk-rightX"},
                    {"Authorization": "Bearer sk-righ"}):
        response = await gw.chat(headers=headers)
        assert response.code == 401, headers
        body = await response.content()
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_api_key"
        assert b"sk-right" not in body and b"sk-wrong" not in body
        assert response.headers.getRawHeaders("www-authenticate") == ["Bearer"]
    assert mock.stats()["chat_requests"] == 0
    response = await gw.client.get(gw.url + "/v1/models")
    assert response.code == 401
    response = await gw.chat(headers={"Authorization": "Bearer sk-other"})
    assert response.code == 200
    # /health, /metrics and /v1/stats stay open without a metrics token
    assert (await gw.client.get(gw.url + "/health")).code == 200
    metrics = await (await gw.client.get(gw.url + "/metrics")).text()
    assert "sk-right" not in metrics and "sk-other" not in metrics
    assert (await gw.client.get(gw.url + "/v1/stats")).code == 200
    # refused before routing: recorded under the model asked for (contract section 8)
    assert gw.sample("nexus_requests_total", model="m", backend="none", status="401") == 6
    assert gw.sample("nexus_errors_total", error_type="invalid_request", model="m") == 6


@pytest_twisted.ensureDeferred
async def test_metrics_token_guards_metrics_and_stats(cleanup: Cleanup) -> None:
    gw = await start_gateway([])
    cleanup.append(gw)
    with_policy(gw, metrics_token="scrape-me")
    for path in ("/metrics", "/v1/stats"):
        response = await gw.client.get(gw.url + path)
        assert response.code == 401
        assert b"scrape-me" not in await response.content()
        response = await gw.client.get(
            gw.url + path, headers={"Authorization": "Bearer scrape-me"}
        )
        assert response.code == 200
        await response.content()
    # the metrics token is not an API key and vice versa: /v1/models stays open here
    assert (await gw.client.get(gw.url + "/v1/models")).code == 200


def test_keys_file_and_constant_time_policy(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    policy = AccessPolicy.from_config(ServerConfig(api_keys=("sk-zero",), api_keys_file=str(keys)))
    assert policy.allows_api([b"Bearer sk-two"]) and policy.allows_api([b"bearer sk-zero"])
    assert not policy.allows_api([b"Bearer sk-three"])
    assert not policy.allows_api([b"Bearer sk-one", b"Bearer sk-two"])  # two headers: refused
    assert not policy.allows_api(None) and not policy.allows_api([b"Bearer "])
    assert AccessPolicy().allows_api(None)
    from nexus.config import ConfigError

    with pytest.raises(ConfigError, match="api_keys_file"):
        AccessPolicy.from_config(ServerConfig(api_keys_file=str(tmp_path / "missing")))


@pytest_twisted.ensureDeferred
async def test_client_key_not_forwarded_to_backend_with_its_own(cleanup: Cleanup) -> None:
    mock = start_mock("keyed", ["m"])
    gw = await start_gateway([mock], backend_options={"keyed": {"api_key_env": "TEST_BACKEND_KEY"}})
    cleanup += [mock, gw]
    with_policy(gw, api_keys=["sk-client"])
    response = await gw.chat(headers={"Authorization": "Bearer sk-client"})
    assert response.code == 200
    headers = mock.stats()["last_request"]["headers"]
    assert headers["authorization"] == "Bearer backend-secret"
    assert "sk-client" not in json.dumps(headers)


@pytest_twisted.ensureDeferred
async def test_concurrency_limit_answers_503_with_retry_after(cleanup: Cleanup) -> None:
    mock = start_mock("slow", ["m"], stream_chunks=3, stream_delay_ms=200)
    gw = await start_gateway([mock])
    cleanup += [mock, gw]
    gw.gateway.admission.max_concurrent = 2
    streams = [Deferred.fromCoroutine(gw.chat(stream=True)) for _ in range(2)]
    await wait_for(lambda: len(gw.gateway.admission.active) == 2, what="two in flight")
    response = await gw.chat()
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["1"]
    assert json.loads(await response.content())["error"]["code"] == "service_unavailable"
    for d in streams:
        r = await d
        assert r.code == 200
        await r.content()
    assert (await gw.chat()).code == 200
    assert gw.sample("nexus_requests_total", model="unknown", backend="none", status="503") == 1
    assert gw.sample("nexus_requests_total", model="m", backend="slow", status="200") == 3


class RawClient(Protocol):
    """Raw bytes out; ``closed`` fires with all that came back once the server closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = deadline(Deferred(self._abort), what="the raw answer")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        if not self.closed.called:
            self.closed.callback(self.data)

    def _abort(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def raw(gw: Any, payload: bytes) -> RawClient:
    client = RawClient()
    factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", gw.port.getHost().port, factory)
    await wait_for(lambda: client.transport is not None, what="connected")
    client.transport.write(payload)
    return client


@pytest_twisted.ensureDeferred
async def test_header_limits_and_slow_loris(cleanup: Cleanup) -> None:
    gw = await start_gateway([], request_timeout=0.5)
    cleanup.append(gw)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    client = await raw(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    answer = await client.closed
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"invalid_request_error"' in answer
    client = await raw(gw, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert (await client.closed).startswith(b"HTTP/1.1 400")
    # a body that never finishes arriving is cut after the request timeout
    client = await raw(
        gw,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo",
    )
    answer = await client.closed
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"request_timeout"' in answer
    assert gw.sample("nexus_requests_total", model="unknown", backend="none", status="408") == 1
    # and the gateway still serves (no backends: unhealthy, 503, but it answers)
    assert (await gw.client.get(gw.url + "/health")).code == 503


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused(cleanup: Cleanup) -> None:
    gw = await start_gateway([], max_body_bytes=1000)
    cleanup.append(gw)
    chunk = b"a" * 600
    client = await raw(
        gw,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2,
    )
    answer = await client.closed
    assert answer.startswith(b"HTTP/1.1 413")
    assert gw.sample("nexus_requests_total", model="unknown", backend="none", status="413") == 1


async def running_service(mock: Any, grace: float) -> tuple[GatewayService, str]:
    port = free_port()
    config = Config(
        server=ServerConfig(
            listen=f"tcp:{port}:interface=127.0.0.1", shutdown_grace_seconds=grace
        ),
        health_check=HealthCheckConfig(interval_seconds=60),
        discovery=DiscoveryConfig(enabled=False),  # no browsing the network
        backends=(BackendConfig(name="a", url=mock.url),),
    )
    service = GatewayService(build_gateway(config, reactor), reactor)
    service.startService()
    url = f"http://127.0.0.1:{port}"
    await wait_for(lambda: service.gateway.registry.get("a").healthy, what="healthy")
    return service, url


def stream_request(url: str) -> Deferred[Any]:
    return http_client().post(
        url + "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": [], "stream": True}).encode(),
    )


@pytest_twisted.ensureDeferred
async def test_shutdown_lets_requests_in_flight_finish(cleanup: Cleanup) -> None:
    mock = start_mock("a", ["m"], stream_chunks=4, stream_delay_ms=150)
    cleanup.append(mock)
    service, url = await running_service(mock, grace=10)
    d = stream_request(url)
    await wait_for(lambda: len(service.gateway.admission.active) == 1, what="in flight")
    stopped = service.stopService()
    response = await d
    body = await response.content()
    await stopped
    assert response.code == 200 and body.endswith(b"data: [DONE]\n\n")
    assert b"error" not in body
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await http_client().get(url + "/health")
    registry = prometheus_registry(service.gateway.collector)
    labels = {"model": "m", "backend": "a", "status": "200"}
    assert registry.get_sample_value("nexus_requests_total", labels) == 1
    assert service.gateway.registry.get("a").pending == 0


@pytest_twisted.ensureDeferred
async def test_shutdown_cuts_what_outlives_the_grace_period(cleanup: Cleanup) -> None:
    mock = start_mock("a", ["m"], fail="endless", stream_delay_ms=20)
    cleanup.append(mock)
    service, url = await running_service(mock, grace=0.3)
    response = await stream_request(url)
    assert response.code == 200
    received = treq.collect(response, lambda _: None)
    await service.stopService()
    with pytest.raises(ResponseFailed):  # cut after the grace period
        await received
    registry = prometheus_registry(service.gateway.collector)
    labels = {"model": "m", "backend": "a", "status": "499"}
    assert registry.get_sample_value("nexus_requests_total", labels) == 1
    total = sum(
        s.value
        for family in registry.collect()
        if family.name == "nexus_requests"
        for s in family.samples
        if s.name == "nexus_requests_total"
    )
    assert total == 1  # recorded once, not twice
    assert service.gateway.registry.get("a").pending == 0
    await wait_for(lambda: mock.stats()["in_flight"] == 0, what="upstream closed")
