"""Metrics end to end: the real gateway, real mock backends, real HTTP on 127.0.0.1.

Every number the gateway exports (``/metrics``, its ``CollectorRegistry`` and
``/v1/stats``) is checked against what the test actually sent: a scripted mix of
every outcome of contract section 5, a thousand concurrent requests, and random
model names from clients.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import Counter
from typing import Any

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    ensureDeferred,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.task import LoopingCall
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from nexus.config import RoutingConfig
from nexus.metrics import sanitize_label
from nexus.testing import MockBackend, MockSettings
from tests.prometheus_bridge import prometheus_registry
from tests.support import (
    RunningGateway,
    http_client,
    served_by,
    start_gateway,
    start_mock,
    wait_for,
)
from tests.test_metrics_support import validate_stats

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DONE = b"data: [DONE]\n\n"

Key = tuple[str, tuple[tuple[str, str], ...]]


# -- reading the numbers -----------------------------------------------------------------------


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted(labels.items()))


def registry_samples(gw: RunningGateway) -> dict[Key, float]:
    """Every sample of a prometheus_client registry over the gateway's collector."""
    return {
        _key(s.name, s.labels): s.value
        for family in prometheus_registry(gw.gateway.collector).collect()
        for s in family.samples
    }


def text_samples(text: str) -> dict[Key, float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = _key(s.name, s.labels)
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def series(samples: dict[Key, float], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name``, keyed by the values of ``labels`` (in that order)."""
    out: dict[tuple[str, ...], float] = {}
    for (sample, pairs), value in samples.items():
        if sample == name:
            d = dict(pairs)
            assert set(d) == set(labels), (name, d)
            out[tuple(d[label] for label in labels)] = value
    return out


async def scrape(gw: RunningGateway) -> dict[Key, float]:
    """GET /metrics as a plain client (no Accept header): Prometheus text, parsed."""
    response = await gw.client.get(gw.url + "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [TEXT_CONTENT_TYPE]
    text = (await response.content()).decode("utf-8")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert f"# HELP {name} " in text, f"{name} has no HELP"
    return text_samples(text)


async def stats(gw: RunningGateway) -> dict[str, Any]:
    document = await gw.get_json("/v1/stats")
    validate_stats(document)
    return document


def assert_histograms_consistent(samples: dict[Key, float], family: str, *labels: str) -> None:
    """Buckets are cumulative, ``+Inf`` equals ``_count``, ``_sum`` is finite and >= 0."""
    counts = series(samples, f"{family}_count", *labels)
    sums = series(samples, f"{family}_sum", *labels)
    assert counts.keys() == sums.keys(), family
    buckets: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for (name, pairs), value in samples.items():
        if name == f"{family}_bucket":
            d = dict(pairs)
            le = float(d.pop("le"))
            buckets.setdefault(tuple(d[label] for label in labels), []).append((le, value))
    assert buckets.keys() == counts.keys(), family
    for key, points in buckets.items():
        points.sort()
        values = [v for _, v in points]
        assert values == sorted(values), (family, key, points)
        assert points[-1][0] == math.inf and points[-1][1] == counts[key], (family, key)
        assert math.isfinite(sums[key]) and sums[key] >= 0, (family, key, sums[key])


def assert_registry_matches_text(gw: RunningGateway, scraped: dict[Key, float]) -> None:
    """``/metrics`` and the registry expose exactly the same samples with the same values."""
    assert registry_samples(gw) == scraped


def per_backend(gw: RunningGateway, value: float) -> dict[tuple[str, ...], float]:
    """``value`` for every backend's label, keyed like :func:`series` keys them."""
    return {(sanitize_label(b.name),): value for b in gw.gateway.registry.backends}


def assert_mean_ms(reported: float, seconds: float, n: int) -> None:
    """A /v1/stats mean (ms, 1 decimal) is the /metrics ``_sum / _count`` (0.0 without samples).

    Half a unit of the last decimal, plus float noise: the two sides may add the same
    durations in a different order.
    """
    expected = seconds * 1000 / n if n else 0.0
    assert reported == round(reported, 1), reported
    assert abs(reported - expected) <= 0.05 + 1e-6, (reported, expected)


async def post_raw(gw: RunningGateway, body: bytes) -> Any:
    return await gw.client.post(
        gw.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )


async def answer(response: Any) -> bytes:
    return bytes(await response.content())


# -- the scripted mix --------------------------------------------------------------------------

#: ``(model label, backend label, status)`` -> requests, for the mix below.
EXPECTED_REQUESTS = {
    ("llama3_70b", "alpha_1", "200"): 4,  # 3 plain + 1 stream with usage
    ("llama3_70b", "alpha_1", "400"): 1,  # the backend's own 400, passed through
    ("small", "alpha_1", "200"): 1,  # a stream without usage
    ("big", "alpha_1", "200"): 2,  # served by the fallback "small"
    ("unknown", "none", "400"): 2,  # bad JSON, no model
    ("unknown", "none", "404"): 1,  # a model nothing knows
    ("slow", "hang", "504"): 1,
    ("garbled", "broken", "502"): 1,
    ("forever", "endless", "499"): 1,
    ("gone", "none", "503"): 1,
    # ("flaky", <the backend tried last>, "502"): 1, added by the test
}
EXPECTED_ERRORS = {
    ("invalid_request", "unknown"): 2,
    ("no_backend", "unknown"): 1,
    ("invalid_request", "llama3_70b"): 1,
    ("backend_error", "flaky"): 1,
    ("timeout", "slow"): 1,
    ("parse_error", "garbled"): 1,
    ("client_disconnect", "forever"): 1,
    ("no_healthy_backend", "gone"): 1,
}
#: Raw model name -> requests, as /v1/stats reports them.
EXPECTED_MODEL_REQUESTS = {
    "llama3:70b": 5,
    "big": 2,
    "unknown": 3,
    "small": 1,
    "flaky": 1,
    "slow": 1,
    "garbled": 1,
    "forever": 1,
    "gone": 1,
}
REQUEST_TIMEOUT = 1.0


@pytest_twisted.ensureDeferred
async def test_scripted_mix_is_counted_exactly_everywhere(cleanup: list[Any]) -> None:
    alpha = start_mock("alpha-1", ["llama3:70b", "small"])  # label alpha_1
    flaky_a = start_mock("flaky-a", ["flaky"], fail="500")
    flaky_b = start_mock("flaky-b", ["flaky"], fail="500")
    hang = start_mock("hang", ["slow"], fail="hang")
    broken = start_mock("broken", ["garbled"], fail="invalid_json")
    endless = start_mock("endless", ["forever"], fail="endless", stream_delay_ms=20)
    down = start_mock("down", ["big", "gone"], health_fail=True)
    mocks = [alpha, flaky_a, flaky_b, hang, broken, endless, down]
    gw = await start_gateway(
        mocks,
        routing=RoutingConfig(max_retries=1, fallbacks={"big": ("small",)}),
        request_timeout=REQUEST_TIMEOUT,
        # An unhealthy backend is never asked for its models: these keep "gone" known.
        backend_options={"down": {"models": ("big", "gone")}},
    )
    cleanup += [*mocks, gw]
    assert not gw.gateway.registry.get("down").healthy

    # Nothing recorded yet: every request family is empty, the fleet gauges are there.
    fresh = await scrape(gw)
    assert series(fresh, "nexus_requests_total", "model", "backend", "status") == {}
    assert fresh[_key("nexus_backends_total", {})] == 7

    started = time.monotonic()
    # 3 plain successes, with usage (10 prompt, 5 completion tokens each).
    for _ in range(3):
        response = await gw.chat("llama3:70b")
        assert response.code == 200 and served_by(response) == "alpha-1"
        await answer(response)
    # A stream asking for usage: tokens come from its final usage event.
    response = await gw.chat(
        "llama3:70b", stream=True, stream_options={"include_usage": True}
    )
    assert response.code == 200
    body = await answer(response)
    assert body.endswith(DONE) and b'"usage"' in body
    # A stream without usage: no tokens, still a time to first token.
    response = await gw.chat("small", stream=True)
    assert response.code == 200
    assert (await answer(response)).endswith(DONE)
    # The client's own mistakes: recorded under model "unknown", backend "none".
    response = await post_raw(gw, b"{not json")
    assert response.code == 400
    await answer(response)
    response = await post_raw(gw, b'{"messages": []}')
    assert response.code == 400
    await answer(response)
    response = await gw.chat("gpt-5-does-not-exist")
    assert response.code == 404
    await answer(response)
    # Both "flaky" backends answer 500: one retry, one 502, one error.
    response = await gw.chat("flaky")
    assert response.code == 502
    await answer(response)
    flaky_last = served_by(response)
    assert flaky_last in ("flaky-a", "flaky-b")
    assert flaky_a.stats()["chat_requests"] == 1 and flaky_b.stats()["chat_requests"] == 1
    # A backend that never answers: 504 after the request timeout.
    response = await gw.chat("slow")
    assert response.code == 504
    await answer(response)
    # A 200 whose body is not JSON: 502, parse_error.
    response = await gw.chat("garbled")
    assert response.code == 502
    await answer(response)
    # "big" has no healthy backend: its fallback "small" serves it.
    for _ in range(2):
        response = await gw.chat("big")
        assert response.code == 200
        assert response.headers.getRawHeaders("x-nexus-fallback-model") == ["small"]
        await answer(response)
    # "gone" is known but only on the unhealthy backend, with no fallback: 503.
    response = await gw.chat("gone")
    assert response.code == 503
    await answer(response)
    # The backend refuses temperature > 2 with its own 400: passed through.
    response = await gw.chat("llama3:70b", temperature=9)
    assert response.code == 400
    assert b"temperature" in await answer(response)
    # A stream the client leaves after a few events, although the 200 was sent.
    await gw.stream_then_leave("forever")
    await wait_for(
        lambda: gw.sample(
            "nexus_requests_total", model="forever", backend="endless", status="499"
        ) == 1,
        what="the disconnect recorded",
    )
    await wait_for(lambda: endless.stats()["disconnects"] == 1, what="upstream cancelled")
    elapsed = time.monotonic() - started

    # -- the registry and /metrics agree on every sample ---------------------------------
    scraped = await scrape(gw)
    assert_registry_matches_text(gw, scraped)

    flaky_label = sanitize_label(flaky_last)
    expected_requests = {**EXPECTED_REQUESTS, ("flaky", flaky_label, "502"): 1}
    requests = series(scraped, "nexus_requests_total", "model", "backend", "status")
    assert requests == expected_requests
    assert series(scraped, "nexus_errors_total", "error_type", "model") == EXPECTED_ERRORS
    assert series(scraped, "nexus_fallbacks_total", "from_model", "to_model") == {
        ("big", "small"): 2
    }

    # Durations: one per request, per (model, backend), "none" included.
    per_pair: Counter[tuple[str, str]] = Counter()
    for (model, backend, _), n in expected_requests.items():
        per_pair[model, backend] += n
    durations = series(scraped, "nexus_request_duration_seconds_count", "model", "backend")
    assert durations == dict(per_pair)
    assert_histograms_consistent(
        scraped, "nexus_request_duration_seconds", "model", "backend"
    )
    duration_sums = series(scraped, "nexus_request_duration_seconds_sum", "model", "backend")
    for pair, total in duration_sums.items():
        assert 0 < total <= per_pair[pair] * elapsed, (pair, total, elapsed)
    # The 504 waited for the whole request timeout before answering.
    assert duration_sums["slow", "hang"] >= REQUEST_TIMEOUT

    # Time to first token: the three streams that sent content.
    ttft = series(scraped, "nexus_time_to_first_token_seconds_count", "model", "backend")
    assert ttft == {("llama3_70b", "alpha_1"): 1, ("small", "alpha_1"): 1,
                    ("forever", "endless"): 1}
    assert_histograms_consistent(
        scraped, "nexus_time_to_first_token_seconds", "model", "backend"
    )
    ttft_sums = series(scraped, "nexus_time_to_first_token_seconds_sum", "model", "backend")
    for pair in ttft:
        # A stream's first token cannot come after its last byte.
        assert ttft_sums[pair] <= duration_sums[pair], pair

    # Tokens: only answers that carried usage (the fallback's are under the requested model).
    token_counts = series(scraped, "nexus_tokens_total_count", "model", "backend", "type")
    token_sums = series(scraped, "nexus_tokens_total_sum", "model", "backend", "type")
    assert token_counts == {
        ("llama3_70b", "alpha_1", "prompt"): 4,
        ("llama3_70b", "alpha_1", "completion"): 4,
        ("big", "alpha_1", "prompt"): 2,
        ("big", "alpha_1", "completion"): 2,
    }
    assert token_sums == {
        ("llama3_70b", "alpha_1", "prompt"): 40,
        ("llama3_70b", "alpha_1", "completion"): 20,
        ("big", "alpha_1", "prompt"): 20,
        ("big", "alpha_1", "completion"): 10,
    }
    assert_histograms_consistent(scraped, "nexus_tokens_total", "model", "backend", "type")
    token_buckets = series(scraped, "nexus_tokens_total_bucket", "model", "backend", "type", "le")
    assert token_buckets["llama3_70b", "alpha_1", "prompt", "10.0"] == 4
    assert token_buckets["llama3_70b", "alpha_1", "completion", "10.0"] == 4

    # The fleet, computed at scrape time.
    assert scraped[_key("nexus_backends_total", {})] == 7
    assert scraped[_key("nexus_backends_healthy", {})] == 6
    # llama3:70b, small, flaky, slow, garbled, forever (big and gone are only on "down").
    assert scraped[_key("nexus_models_available", {})] == 6
    pending = series(scraped, "nexus_pending_requests", "backend")
    assert pending == per_backend(gw, 0)
    assert all(b.pending == 0 for b in gw.gateway.registry.backends)
    # One health round so far: one probe (GET /v1/models) per backend, the 500s included.
    latency = series(scraped, "nexus_backend_latency_seconds_count", "backend")
    assert latency == per_backend(gw, 1)
    assert_histograms_consistent(scraped, "nexus_backend_latency_seconds", "backend")

    # get_sample_value, the way other tests read single numbers, agrees too.
    assert gw.sample("nexus_requests_total", model="unknown", backend="none", status="404") == 1
    assert gw.sample("nexus_errors_total", error_type="backend_error", model="flaky") == 1
    assert gw.sample("nexus_fallbacks_total", from_model="big", to_model="small") == 2
    assert gw.sample("nexus_pending_requests", backend="hang") == 0

    # -- /v1/stats: the same numbers, raw names ------------------------------------------
    document = await stats(gw)
    total = sum(requests.values())
    success = sum(n for (_, _, status), n in requests.items() if status.startswith("2"))
    assert document["requests"] == {"total": total, "success": success, "errors": total - success}
    assert (total, success) == (16, 7)
    backend_names = sorted(b.name for b in gw.gateway.registry.backends)
    assert [b["id"] for b in document["backends"]] == backend_names
    durations_sum_by_backend: Counter[str] = Counter()
    for (_, backend), value in duration_sums.items():
        durations_sum_by_backend[backend] += value
    for row in document["backends"]:
        label = sanitize_label(row["id"])
        served = sum(n for (_, b, _), n in requests.items() if b == label)
        assert row["requests"] == served, row
        assert row["pending"] == 0
        assert_mean_ms(row["average_latency_ms"], durations_sum_by_backend[label], served)
    assert "none" not in {row["id"] for row in document["backends"]}
    assert {row["source"] for row in document["backends"]} == {"config"}
    down = next(row for row in document["backends"] if row["id"] == "down")
    # Never discovered (it failed its check): it lists its configured models.
    assert (down["status"], down["models"]) == ("unhealthy", ["big", "gone"])
    models = {row["name"]: row for row in document["models"]}
    assert {name: row["requests"] for name, row in models.items()} == EXPECTED_MODEL_REQUESTS
    for name, row in models.items():
        label = sanitize_label(name)
        from_metrics = sum(n for (m, _, _), n in requests.items() if m == label)
        assert row["requests"] == from_metrics, row
        seconds = sum(v for (m, _), v in duration_sums.items() if m == label)
        assert_mean_ms(row["average_duration_ms"], seconds, from_metrics)
    order = [(-row["requests"], row["name"]) for row in document["models"]]
    assert order == sorted(order)

    # -- every health round adds one latency sample per backend --------------------------
    for rounds in (2, 3):
        await gw.check_health()
        latency = series(await scrape(gw), "nexus_backend_latency_seconds_count", "backend")
        assert latency == per_backend(gw, rounds)
    # Health checks and scrapes are not requests.
    assert series(registry_samples(gw), "nexus_requests_total", "model", "backend",
                  "status") == expected_requests


# -- a thousand concurrent requests ------------------------------------------------------------

TOTAL = 1000
STREAMS = 300
# The default listen backlog (50) overflows when a thousand connections arrive at once:
# the kernel drops SYNs and handshake ACKs, clients wait out 1 s+ retransmits and some
# connections are lost. That measures the accept queue, not the gateway's counting.
BACKLOG = 1024


def is_stream(i: int) -> bool:
    """Every third request, until there are STREAMS of them, is a stream."""
    step = TOTAL // STREAMS
    return i % step == 0 and i // step < STREAMS


def wants_usage(i: int) -> bool:
    """Half of the streams ask for a final usage event."""
    return is_stream(i) and i % 2 == 0


def listen_mock_with_backlog(name: str, **knobs: Any) -> MockBackend:
    backend = MockBackend(MockSettings(name=name, models=["m"], **knobs), reactor)
    backend.port = reactor.listenTCP(0, backend.site, backlog=BACKLOG, interface="127.0.0.1")
    return backend


async def relisten_with_backlog(gw: RunningGateway) -> None:
    await maybeDeferred(gw.port.stopListening)
    gw.port = reactor.listenTCP(0, gw.gateway.site, backlog=BACKLOG, interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_thousand_concurrent_requests_are_counted_exactly(cleanup: list[Any]) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Each request in flight holds four sockets in this process: the client's, the
    # gateway's accepted one, the gateway's upstream one and the mock's accepted one.
    in_flight = min(TOTAL, (soft - 200) // 4)
    assert in_flight >= 100, f"ulimit -n is {soft}: too low for this test"
    mocks = [
        listen_mock_with_backlog("c-1", stream_chunks=5, stream_delay_ms=5),
        listen_mock_with_backlog("c-2", stream_chunks=5, stream_delay_ms=10, latency_ms=5),
        listen_mock_with_backlog("c-3", stream_chunks=3, stream_delay_ms=5),
    ]
    gw = await start_gateway(mocks, request_timeout=60.0)
    cleanup += [*mocks, gw]
    await relisten_with_backlog(gw)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = in_flight
    pool.retryAutomatically = False  # a retried POST would be counted twice
    client = http_client(pool)
    cleanup.append(_PoolCloser(pool))
    limit = DeferredSemaphore(in_flight)
    served: Counter[str] = Counter()
    codes: Counter[int] = Counter()

    async def one(i: int) -> None:
        stream = is_stream(i)
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body["stream"] = True
            if wants_usage(i):
                body["stream_options"] = {"include_usage": True}
        await limit.acquire()
        try:
            response = await client.post(
                gw.url + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            data = await response.content()
        finally:
            limit.release()
        codes[response.code] += 1
        served[served_by(response)] += 1
        if stream:
            assert data.endswith(DONE), data[-200:]
        else:
            assert json.loads(data)["object"] == "chat.completion"

    assert sum(map(is_stream, range(TOTAL))) == STREAMS
    with_usage = sum(map(wants_usage, range(TOTAL)))
    assert with_usage == STREAMS // 2

    peak = [0]

    def sample_pending() -> None:
        peak[0] = max(peak[0], sum(b.pending for b in gw.gateway.registry.backends))

    sampler = LoopingCall(sample_pending)
    sampler.clock = reactor
    sampler.start(0.005)
    try:
        await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(TOTAL)],
                            consumeErrors=True)
    finally:
        sampler.stop()
    assert codes == {200: TOTAL}
    assert peak[0] > 1, "the requests never overlapped"

    scraped = await scrape(gw)
    assert_registry_matches_text(gw, scraped)
    requests = series(scraped, "nexus_requests_total", "model", "backend", "status")
    assert sum(requests.values()) == TOTAL
    assert {status for (_, _, status) in requests} == {"200"}
    mock_counts = {sanitize_label(m.settings.name): m.stats()["chat_requests"] for m in mocks}
    by_backend: Counter[str] = Counter()
    for (_, backend, _), n in requests.items():
        by_backend[backend] += n
    assert dict(by_backend) == mock_counts
    assert sum(mock_counts.values()) == TOTAL
    assert {sanitize_label(k): v for k, v in served.items()} == mock_counts
    assert series(scraped, "nexus_errors_total", "error_type", "model") == {}
    durations = series(scraped, "nexus_request_duration_seconds_count", "model", "backend")
    assert durations == {("m", b): n for b, n in by_backend.items()}
    ttft = series(scraped, "nexus_time_to_first_token_seconds_count", "model", "backend")
    assert sum(ttft.values()) == STREAMS
    tokens = series(scraped, "nexus_tokens_total_count", "model", "backend", "type")
    for kind in ("prompt", "completion"):
        counted = sum(n for (_, _, t), n in tokens.items() if t == kind)
        assert counted == TOTAL - STREAMS + with_usage, kind
    assert_histograms_consistent(scraped, "nexus_request_duration_seconds", "model", "backend")

    # Nothing left in flight, anywhere.
    assert series(scraped, "nexus_pending_requests", "backend") == per_backend(gw, 0)
    assert all(b.pending == 0 for b in gw.gateway.registry.backends)
    assert all(m.stats()["in_flight"] == 0 for m in mocks)
    document = await stats(gw)
    assert document["requests"] == {"total": TOTAL, "success": TOTAL, "errors": 0}
    assert {row["id"]: row["requests"] for row in document["backends"]} == {
        m.settings.name: m.stats()["chat_requests"] for m in mocks
    }
    assert all(row["pending"] == 0 for row in document["backends"])
    [model] = document["models"]
    assert (model["name"], model["requests"]) == ("m", TOTAL)
    sums = series(scraped, "nexus_request_duration_seconds_sum", "model", "backend")
    assert_mean_ms(model["average_duration_ms"], sum(sums.values()), TOTAL)


class _PoolCloser:
    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stop(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


# -- random model names never add series -------------------------------------------------------

KNOWN = ("m", "llama3:70b", "gpt-4")  # "gpt-4" is an alias of llama3:70b
MODEL_LABELLED = {
    "nexus_requests_total": "model",
    "nexus_errors_total": "model",
    "nexus_request_duration_seconds_count": "model",
    "nexus_time_to_first_token_seconds_count": "model",
    "nexus_tokens_total_count": "model",
    "nexus_fallbacks_total": "from_model",
}

model_names = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:-._/ ", min_size=1, max_size=20),
    st.sampled_from(
        [*KNOWN, "M", "m ", " m", "llama3_70b", "llama3:70B", "gpt_4", "unknown", "none", "_",
         "4o", "m\u00e9", "\u0000", "m" * 300]
    ),
)


def _model_labels(samples: dict[Key, float]) -> set[str]:
    out: set[str] = set()
    for (name, pairs), _ in samples.items():
        label = MODEL_LABELLED.get(name)
        if label is not None:
            out.add(dict(pairs)[label])
    return out


@pytest_twisted.ensureDeferred
async def test_random_model_names_never_add_series(cleanup: list[Any]) -> None:
    mock = start_mock("solo", ["m", "llama3:70b"])
    gw = await start_gateway([mock], routing=RoutingConfig(aliases={"gpt-4": "llama3:70b"}))
    cleanup += [mock, gw]
    allowed = {sanitize_label(m) for m in gw.gateway.registry.known_models} | {"unknown"}
    assert allowed == {"m", "llama3_70b", "gpt_4", "unknown"}
    sent = [0]

    async def check(name: str) -> None:
        response = await gw.chat(name)
        await response.content()
        sent[0] += 1
        if name in KNOWN:
            assert response.code == 200
        elif name:
            assert response.code == 404
        else:
            assert response.code == 400
        scraped = await scrape(gw)
        requests = series(scraped, "nexus_requests_total", "model", "backend", "status")
        assert sum(requests.values()) == sent[0]  # exactly once
        assert _model_labels(scraped) <= allowed
        assert {backend for (_, backend, _) in requests} <= {"solo", "none"}
        document = await stats(gw)
        assert {row["name"] for row in document["models"]} <= {*KNOWN, "unknown"}
        # (m | llama3:70b | gpt-4, solo) and (unknown, none): nothing else, ever.
        assert len(gw.gateway.collector.pairs) <= 4

    # Hypothesis drives the examples from a worker thread (so it can shrink a failure);
    # each example runs on the reactor, which keeps serving while the thread waits.
    @settings(max_examples=50, deadline=None, database=None)
    @given(name=model_names)
    def examples(name: str) -> None:
        blockingCallFromThread(reactor, lambda: ensureDeferred(check(name)))

    await deferToThread(examples)
    assert sent[0] >= 50


# -- client disconnects ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_disconnects_are_recorded_once_and_not_logged_as_failures(
    cleanup: list[Any],
) -> None:
    """A client leaving (before the headers, or mid-stream) is a 499, not a gateway bug."""
    waiter = start_mock("waiter", ["w"], fail="hang")
    endless = start_mock("endless", ["forever"], fail="endless", stream_delay_ms=20)
    gw = await start_gateway([waiter, endless], request_timeout=30.0)
    cleanup += [waiter, endless, gw]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        # Non-streaming: the client gives up while the backend is still thinking.
        pending = ensureDeferred(gw.chat("w"))
        pending.addErrback(lambda _: None)
        await wait_for(lambda: waiter.stats()["in_flight"] == 1, what="request upstream")
        pending.cancel()
        await wait_for(
            lambda: gw.sample("nexus_requests_total", model="w", backend="waiter",
                              status="499") == 1,
            what="the first disconnect recorded",
        )
        await wait_for(lambda: waiter.stats()["disconnects"] == 1, what="upstream cancelled")
        # Streaming: the 200 is out when the client leaves.
        await gw.stream_then_leave("forever")
        await wait_for(
            lambda: gw.sample("nexus_requests_total", model="forever", backend="endless",
                              status="499") == 1,
            what="the second disconnect recorded",
        )
        await wait_for(lambda: endless.stats()["disconnects"] == 1, what="upstream cancelled")
    finally:
        globalLogPublisher.removeObserver(events.append)
    samples = registry_samples(gw)
    assert series(samples, "nexus_requests_total", "model", "backend", "status") == {
        ("w", "waiter", "499"): 1,
        ("forever", "endless", "499"): 1,
    }
    assert series(samples, "nexus_errors_total", "error_type", "model") == {
        ("client_disconnect", "w"): 1,
        ("client_disconnect", "forever"): 1,
    }
    assert series(samples, "nexus_pending_requests", "backend") == per_backend(gw, 0)
    assert all(b.pending == 0 for b in gw.gateway.registry.backends)
    # A client hanging up is routine: no traceback, no "unexpected error" in the log.
    failures = [formatEvent(e) for e in events if "log_failure" in e]
    assert failures == [], failures


@pytest_twisted.ensureDeferred
async def test_a_client_that_left_is_not_retried_on_another_backend(cleanup: list[Any]) -> None:
    """Leaving while the first backend thinks must not start an attempt on the next one."""
    first = start_mock("hang-a", ["w"], fail="hang")
    second = start_mock("hang-b", ["w"], fail="hang")
    gw = await start_gateway(
        [first, second], routing=RoutingConfig(max_retries=1), request_timeout=30.0
    )
    cleanup += [first, second, gw]
    pending = ensureDeferred(gw.chat("w"))
    pending.addErrback(lambda _: None)
    await wait_for(
        lambda: first.stats()["in_flight"] + second.stats()["in_flight"] == 1,
        what="the first attempt upstream",
    )
    tried = next(m for m in (first, second) if m.stats()["in_flight"] == 1)
    pending.cancel()  # the client hangs up
    await wait_for(
        lambda: gw.sample("nexus_requests_total", model="w",
                          backend=sanitize_label(tried.settings.name), status="499") == 1,
        what="the disconnect recorded",
    )
    # The gateway records the 499, cancels the upstream request and would start any
    # further attempt in the same call chain (its connectionLost): nothing may be in
    # flight any more, anywhere.
    in_flight = {b.name: b.pending for b in gw.gateway.registry.backends}
    assert in_flight == {"hang-a": 0, "hang-b": 0}
    await wait_for(lambda: tried.stats()["disconnects"] == 1, what="upstream cancelled")
    document = await stats(gw)  # one more round trip through the gateway
    assert [row["pending"] for row in document["backends"]] == [0, 0]
    assert first.stats()["chat_requests"] + second.stats()["chat_requests"] == 1
    assert series(registry_samples(gw), "nexus_requests_total", "model", "backend", "status") == {
        ("w", sanitize_label(tried.settings.name), "499"): 1
    }
