"""MetricsResource and StatsResource over HTTP: negotiation, HEAD, 405, failures."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from nexus.metrics import MetricsCollector, MetricsResource, StatsResource
from tests.support import DeadlineAgent, http_client
from tests.test_metrics_support import (
    expected_scenario,
    make_collector,
    parse_text,
    record_request,
    record_scenario,
    samples_of,
    validate_stats,
)

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# What Prometheus sends (2.49+ and 3.x; older 2.x had no q on the first entry).
PROMETHEUS_2 = (
    "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_2_OLD = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _root(collector: MetricsCollector) -> Resource:
    root = Resource()
    v1 = Resource()
    root.putChild(b"metrics", MetricsResource(collector))
    root.putChild(b"v1", v1)
    v1.putChild(b"stats", StatsResource(collector))
    return root


@pytest.fixture
def collector() -> MetricsCollector:
    collector, _ = make_collector()
    record_scenario(collector)
    return collector


@pytest.fixture
def stub(collector: MetricsCollector) -> RequestTraversalAgent:
    # treq's in-memory agent without treq's client on top, which would ask for gzip
    # itself and decode it, hiding what the resource negotiated.
    return RequestTraversalAgent(_root(collector))


def _result(stub: RequestTraversalAgent, deferred: Deferred[Any]) -> Any:
    """The result of an in-memory request's Deferred (answered synchronously)."""
    results: list[Any] = []
    failures: list[Failure] = []
    deferred.addCallbacks(results.append, failures.append)
    stub.flush()
    if failures:
        failures[0].raiseException()
    assert results, "no response"
    return results[0]


def _request(
    stub: RequestTraversalAgent, method: str, path: str, **headers: str
) -> tuple[Any, bytes]:
    """``headers`` as keywords: ``accept_encoding`` is sent as ``Accept-Encoding``."""
    sent = Headers({name.replace("_", "-"): [value] for name, value in headers.items()})
    url = f"http://127.0.0.1{path}".encode()
    response = _result(stub, stub.request(method.encode(), url, sent))
    return response, _result(stub, treq.content(response))


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else values[0]


def test_plain_get_is_prometheus_text(stub: RequestTraversalAgent) -> None:
    response, body = _request(stub, "GET", "/metrics")
    assert response.code == 200
    assert _header(response, "content-type") == TEXT
    assert _header(response, "content-encoding") is None
    assert parse_text(body) == pytest.approx(expected_scenario())


@pytest.mark.parametrize("accept", [PROMETHEUS_2, PROMETHEUS_3, PROMETHEUS_2_OLD])
def test_prometheus_gets_gzipped_openmetrics(stub: RequestTraversalAgent, accept: str) -> None:
    response, body = _request(stub, "GET", "/metrics", accept=accept, accept_encoding="gzip")
    assert response.code == 200
    assert _header(response, "content-type") == OPENMETRICS
    assert _header(response, "content-encoding") == "gzip"
    assert "Accept-Encoding" in (_header(response, "vary") or "")
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n")
    assert samples_of(parse_openmetrics(text)) == pytest.approx(expected_scenario())


@pytest.mark.parametrize(
    "accept",
    [
        "*/*",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "text/plain;version=0.0.4",
        "application/openmetrics-text;version=2.0.0,text/plain;q=0.1",
        "application/openmetrics-text;q=0.2,text/plain;q=0.9",
        "application/openmetrics-text;q=0",
        "application/openmetrics-text;q=oops",
    ],
)
def test_everything_else_gets_prometheus_text(stub: RequestTraversalAgent, accept: str) -> None:
    response, body = _request(stub, "GET", "/metrics", accept=accept, accept_encoding="identity")
    assert _header(response, "content-type") == TEXT
    assert _header(response, "content-encoding") is None
    assert not body.endswith(b"# EOF\n")


@pytest.mark.parametrize("encoding", ["gzip", "deflate, gzip;q=0.5", "x-gzip"])
def test_gzip_when_accepted(stub: RequestTraversalAgent, encoding: str) -> None:
    response, body = _request(stub, "GET", "/metrics", accept_encoding=encoding)
    assert _header(response, "content-encoding") == "gzip"
    assert parse_text(gzip.decompress(body)) == pytest.approx(expected_scenario())


@pytest.mark.parametrize("encoding", ["gzip;q=0", "br", "identity"])
def test_no_gzip_when_not_accepted(stub: RequestTraversalAgent, encoding: str) -> None:
    response, body = _request(stub, "GET", "/metrics", accept_encoding=encoding)
    assert _header(response, "content-encoding") is None
    assert body.startswith(b"# HELP")


@pytest.mark.parametrize("path", ["/metrics", "/v1/stats"])
def test_head_has_headers_and_no_body(stub: RequestTraversalAgent, path: str) -> None:
    get, get_body = _request(stub, "GET", path)
    head, head_body = _request(stub, "HEAD", path)
    assert head.code == 200
    assert head_body == b""
    assert _header(head, "content-type") == _header(get, "content-type")
    assert _header(head, "content-length") == str(len(get_body))


@pytest.mark.parametrize("path", ["/metrics", "/v1/stats"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_openai_errors(
    stub: RequestTraversalAgent, path: str, method: str
) -> None:
    response, body = _request(stub, method, path)
    assert response.code == 405
    assert _header(response, "content-type") == "application/json"
    assert _header(response, "allow") == "GET, HEAD"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "method_not_allowed"
    assert method in error["message"] and path in error["message"]
    assert error["param"] is None


def test_stats_resource_serves_the_schema(stub: RequestTraversalAgent) -> None:
    response, body = _request(stub, "GET", "/v1/stats")
    assert response.code == 200
    assert _header(response, "content-type") == "application/json"
    document = json.loads(body)
    validate_stats(document)
    assert document["requests"] == {"total": 10, "success": 5, "errors": 5}


@pytest.mark.parametrize(
    ("path", "method"), [("/metrics", "render"), ("/v1/stats", "stats_json")]
)
def test_a_rendering_error_is_logged_and_answered_500(
    collector: MetricsCollector,
    stub: RequestTraversalAgent,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    method: str,
) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(collector, method, broken)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response, body = _request(stub, "GET", path, accept_encoding="gzip")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 500
    assert _header(response, "content-type") == "application/json"
    assert _header(response, "content-encoding") is None
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    # The next scrape works again.
    monkeypatch.undo()
    response, _ = _request(stub, "GET", path)
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_real_site_on_localhost(collector: MetricsCollector) -> None:
    port = reactor.listenTCP(0, Site(_root(collector)), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    # Agents with the default non-persistent pool: no connection outlives the test.
    client = http_client()
    try:
        # Like Prometheus: a plain Agent, so the gzip body is seen as sent.
        headers = Headers({"Accept": [PROMETHEUS_3], "Accept-Encoding": ["gzip"]})
        agent = DeadlineAgent(Agent(reactor))
        response = await agent.request(b"GET", f"{url}/metrics".encode(), headers)
        body = await treq.content(response)
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == [OPENMETRICS]
        assert response.headers.getRawHeaders("content-encoding") == ["gzip"]
        text = gzip.decompress(body).decode()
        assert samples_of(parse_openmetrics(text)) == pytest.approx(expected_scenario())

        record_request(collector, "mistral:7b", "gpu-a", 200, 0.5)
        response = await client.get(f"{url}/metrics")
        samples = parse_text(await response.content())
        series = frozenset({"model": "mistral_7b", "backend": "gpu_a", "status": "200"}.items())
        assert samples[("nexus_requests_total", series)] == 2

        response = await client.get(f"{url}/v1/stats")
        assert json.loads(await response.content())["requests"]["total"] == 11

        response = await client.post(f"{url}/metrics", data=b"x")
        assert response.code == 405
        assert json.loads(await response.content())["error"]["code"] == "method_not_allowed"
    finally:
        await port.stopListening()
