"""The dashboard (contract section 9): charts' buckets, the event hub, the live view, HTTP.

The page in a real browser against a real ``twistd nexus``: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from nexus.config import BackendConfig, HealthCheckConfig
from nexus.dashboard.hub import EventHub, frame
from nexus.dashboard.live import FLUSH_SECONDS, MAX_PER_FLUSH, RECENT, LiveView
from nexus.dashboard.page import fmt_ms, fmt_uptime
from nexus.dashboard.timeseries import (
    BOUNDS,
    BUCKET_SECONDS,
    BUCKETS,
    CLIENT_DISCONNECT,
    ERROR,
    RATIO,
    SUCCESS,
    TimeSeries,
    outcome,
    percentile,
)
from nexus.dashboard.web import COOKIE, session_value
from nexus.metrics import MetricsCollector
from nexus.registry import HEALTHY, UNHEALTHY, BackendRegistry
from nexus.tracking import RequestRecord
from tests.support import (
    Cleanup,
    StreamedBody,
    deadline,
    start_gateway,
    start_mock,
    wait_for,
)

SSE_EVENT = re.compile(rb"event: (\w+)\ndata: ([^\n]*)\n\n")


def events(data: bytes) -> list[tuple[str, Any]]:
    """The ``(event, parsed data)`` pairs of an SSE byte stream."""
    return [(m[1].decode(), json.loads(m[2])) for m in SSE_EVENT.finditer(data)]


def finished(request_id: str = "r", status: int = 200, duration: float = 0.05,
             model: str | None = "m", backend: str | None = "a", gone: bool = False
             ) -> RequestRecord:
    record = RequestRecord(started=0.0, request_id=request_id, model=model, backend=backend)
    record.client_gone = gone
    record.finish(status, duration)
    return record


# -- the charts' time series ----------------------------------------------------------------


def test_outcomes_are_the_request_log_statuses() -> None:
    assert outcome(finished(status=200)) == SUCCESS
    assert outcome(finished(status=502)) == ERROR
    assert outcome(finished(status=404)) == ERROR
    assert outcome(finished(status=499, gone=True)) == CLIENT_DISCONNECT
    assert outcome(finished(status=499)) == ERROR  # a 499 the gateway sent itself


def test_buckets_count_rates_by_outcome_over_ten_seconds() -> None:
    now = [10_000.0]
    series = TimeSeries(lambda: now[0])
    for _ in range(20):
        series.record(finished(status=200, duration=0.1))
    series.record(finished(status=500, duration=0.2))
    series.record(finished(status=499, gone=True))
    now[0] += BUCKET_SECONDS  # the next bucket
    series.record(finished(status=200, duration=1.0))
    now[0] += 5
    points = series.points()
    assert len(points) == BUCKETS
    done, current = points[-2], points[-1]
    assert done[0] == 10_000 and current[0] == 10_010
    assert done[1:4] == [2.0, 0.1, 0.1]  # per second over the whole bucket
    assert current[1:4] == [0.2, 0.0, 0.0]  # over the 5 s it has lasted
    assert done[4] == pytest.approx(100, rel=0.08)
    assert current[4] == current[5] == pytest.approx(1000, rel=0.08)
    assert points[0][1:] == [0.0, 0.0, 0.0, None, None]


def test_fifteen_minutes_are_kept_and_older_buckets_forgotten() -> None:
    now = [0.0]
    series = TimeSeries(lambda: now[0])
    for minute in range(20):
        now[0] = minute * 60.0
        series.record(finished())
    now[0] += BUCKET_SECONDS  # the last one's bucket is over
    points = series.points()
    assert len(points) == BUCKETS == 15 * 60 // BUCKET_SECONDS
    assert points[0][0] == now[0] - (BUCKETS - 1) * BUCKET_SECONDS
    assert sum(p[1] for p in points) * BUCKET_SECONDS == pytest.approx(15)  # minutes 5 to 19
    # The ring holds BUCKETS buckets, whatever the time: memory does not grow.
    assert len(series._ring) == BUCKETS


def test_a_wall_clock_stepping_back_does_not_rewrite_the_past() -> None:
    now = [1000.0]
    series = TimeSeries(lambda: now[0])
    series.record(finished())
    now[0] = 900.0
    series.record(finished())  # ignored: its bucket is gone
    now[0] = 1010.0
    points = {p[0]: p for p in series.points()}
    assert points[1000][1] == pytest.approx(0.1) and points[900][1] == 0.0


@given(st.lists(st.floats(min_value=0.002, max_value=500.0), min_size=1, max_size=200),
       st.sampled_from([0.5, 0.95]))
def test_percentiles_are_within_one_bin_of_the_exact_value(
    durations: list[float], q: float
) -> None:
    bins = [0] * (len(BOUNDS) + 1)
    for d in durations:
        bins[sum(1 for b in BOUNDS if b < d)] += 1
    exact = sorted(durations)[max(1, math.ceil(q * len(durations))) - 1]
    estimate = percentile(bins, len(durations), q)
    assert exact / RATIO <= estimate <= exact * RATIO


# -- SSE framing and the hub ----------------------------------------------------------------


@given(st.text(), st.text())
def test_an_event_is_one_event_whatever_its_strings(name: str, message: str) -> None:
    data = frame("request", {"model": name, "error_message": message})
    assert data.endswith(b"\n\n") and data.count(b"\n") == 3
    assert events(data) == [("request", {"model": name, "error_message": message})]


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeRequest:
    """What the hub uses of a request: write, finish, a producer, its end."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.channel: FakeChannel | None = FakeChannel()
        self.transport = self.channel.transport
        self.finished = 0
        self.producer: Any = None
        self.ends: list[Deferred[None]] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.written.append(data)

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.ends.append(d)
        return d

    def finish(self) -> None:
        self.finished = 1
        for d in self.ends:
            d.callback(None)

    def lose(self) -> None:
        self.channel = None
        for d in self.ends:
            d.errback(Failure(ConnectionDone()))

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 50000)

    @property
    def data(self) -> bytes:
        return b"".join(self.written)


def test_a_paused_subscriber_queues_then_catches_up_in_order() -> None:
    hub = EventHub(max_queued_bytes=100)
    request = FakeRequest()
    subscriber = hub.subscribe(request)  # type: ignore[arg-type]
    assert subscriber is not None and request.producer is subscriber
    hub.broadcast(b"1")
    subscriber.pauseProducing()  # the socket's buffer is full
    hub.broadcast(b"2")
    hub.broadcast(b"3")
    assert request.data == b"1" and subscriber.queued == 2
    subscriber.resumeProducing()
    assert request.data == b"123" and subscriber.queued == 0
    assert len(hub) == 1


def test_a_subscriber_that_falls_behind_is_dropped_and_its_memory_freed() -> None:
    idle: list[bool] = []
    hub = EventHub(max_queued_bytes=10, on_idle=lambda: idle.append(True))
    slow, fast = FakeRequest(), FakeRequest()
    slow_sub = hub.subscribe(slow)  # type: ignore[arg-type]
    hub.subscribe(fast)  # type: ignore[arg-type]
    assert slow_sub is not None
    slow_sub.pauseProducing()
    for _ in range(5):
        hub.broadcast(b"xxxx")  # the third no longer fits in 10 bytes
    assert len(hub) == 1 and hub.dropped == 1
    assert slow.transport.aborted and slow.producer is None
    assert slow_sub.queued == 0 and not slow_sub.queue
    assert fast.data == b"xxxx" * 5
    hub.remove(next(iter(hub.subscribers)))
    assert idle == [True]


def test_a_lost_connection_leaves_the_hub_and_close_finishes_the_others() -> None:
    hub = EventHub()
    gone, staying = FakeRequest(), FakeRequest()
    hub.subscribe(gone)  # type: ignore[arg-type]
    hub.subscribe(staying)  # type: ignore[arg-type]
    gone.lose()
    assert len(hub) == 1
    hub.broadcast(b"x")
    hub.close()
    assert len(hub) == 0 and staying.finished and staying.producer is None


def test_a_stream_that_fails_to_write_is_dropped_and_the_others_still_get_the_event() -> None:
    hub = EventHub()
    broken, fine = FakeRequest(), FakeRequest()

    def fail(data: bytes) -> None:
        raise RuntimeError("the channel broke")

    broken.write = fail  # type: ignore[method-assign]
    hub.subscribe(broken)  # type: ignore[arg-type]
    hub.subscribe(fine)  # type: ignore[arg-type]
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        hub.broadcast(b"event")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert fine.data == b"event" and len(hub) == 1 and broken.transport.aborted
    assert any(e.get("log_failure") is not None for e in logged)


def test_the_hub_refuses_subscribers_past_its_limit() -> None:
    hub = EventHub(max_subscribers=2)
    assert hub.subscribe(FakeRequest()) is not None  # type: ignore[arg-type]
    assert hub.subscribe(FakeRequest()) is not None  # type: ignore[arg-type]
    assert hub.subscribe(FakeRequest()) is None  # type: ignore[arg-type]


# -- the live view --------------------------------------------------------------------------


@pytest.fixture
def live() -> Iterator[tuple[LiveView, Clock, BackendRegistry]]:
    registry = BackendRegistry(
        [BackendConfig(name="a", url="http://a.test", models=("m",),
                       model_capabilities={"m": frozenset({"tools"})}),
         BackendConfig(name="b", url="http://b.test", models=("m", "n"))],
        aliases={"big": "m"},
    )
    registry.get("a").status = HEALTHY
    collector = MetricsCollector(registry)
    clock = Clock()
    clock.advance(1_000_000)
    view = LiveView(registry, collector, clock, clock=clock.seconds)
    yield view, clock, registry
    view.close()


def record(view: LiveView, *records: RequestRecord) -> None:
    for r in records:
        view.collector.record_request(r)
        view.record(r)


def test_a_new_subscriber_gets_the_state_then_the_requests_so_far(live: Any) -> None:
    view, _, _ = live
    record(view, finished("first", backend="a"), finished("second", status=502, backend="a"))
    request = FakeRequest()
    view.subscribe(request)
    assert request.data.startswith(b"retry: 2000\n\n")
    got = events(request.data)
    assert [name for name, _ in got] == ["stats", "backend", "backend", "request", "request"]
    stats = got[0][1]
    assert stats["requests"] == {"total": 2, "success": 1, "errors": 1}
    assert stats["error_rate"] == 0.5
    a = stats["backends"][0]
    assert (a["id"], a["status"], a["requests"], a["errors"], a["models"]) == (
        "a", HEALTHY, 2, 1, ["m"])
    assert stats["matrix"] == [
        {"model": "m", "backends": {"a": {"status": "healthy", "capabilities": ["tools"]},
                                    "b": {"status": "unknown", "capabilities": None}}},
        {"model": "n", "backends": {"b": {"status": "unknown", "capabilities": None}}},
    ]
    assert stats["aliases"] == {"big": "m"}
    assert len(stats["series"]["points"]) == BUCKETS
    assert got[1][1]["id"] == "a" and got[1][1]["models"] == 1  # a fleet entry
    first, second = got[3][1], got[4][1]
    assert (first["request_id"], second["request_id"]) == ("first", "second")  # oldest first
    assert second["status"] == "error" and second["finished_at"].endswith("Z")


def test_requests_go_out_in_one_batch_per_flush_newest_only(live: Any) -> None:
    view, clock, _ = live
    request = FakeRequest()
    view.subscribe(request)
    start = len(request.written)
    record(view, *(finished(f"r{i}") for i in range(MAX_PER_FLUSH + 30)))
    assert len(request.written) == start  # nothing before the flush
    clock.advance(FLUSH_SECONDS)
    assert len(request.written) == start + 1  # one write for the batch
    got = events(request.written[-1])
    assert len(got) == MAX_PER_FLUSH
    assert got[-1][1]["request_id"] == f"r{MAX_PER_FLUSH + 29}"
    assert len(view.recent) == RECENT


def test_a_second_subscriber_does_not_get_a_request_twice(live: Any) -> None:
    view, clock, _ = live
    early, late = FakeRequest(), FakeRequest()
    view.subscribe(early)
    record(view, finished("pending"))
    view.subscribe(late)  # before the flush: not in its replay, in the flush
    clock.advance(FLUSH_SECONDS)
    for request in (early, late):
        ids = [d["request_id"] for name, d in events(request.data) if name == "request"]
        assert ids == ["pending"]


def test_stats_every_two_seconds_only_while_someone_listens(live: Any) -> None:
    view, clock, _ = live
    assert clock.getDelayedCalls() == []
    request = FakeRequest()
    view.subscribe(request)
    clock.advance(2.0)
    clock.advance(2.0)
    assert [name for name, _ in events(request.data)].count("stats") == 3
    request.lose()
    assert len(view.hub) == 0
    assert clock.getDelayedCalls() == []  # no timer while nobody looks
    record(view, finished())
    assert clock.getDelayedCalls() == []


def test_backend_changes_are_sent_at_once(live: Any) -> None:
    view, _, registry = live
    request = FakeRequest()
    view.subscribe(request)
    b = registry.get("b")
    b.status = UNHEALTHY
    b.last_error = "GET /v1/models answered 500"
    registry.changed(b)
    registry.add(BackendConfig(name="c", url="http://c.test"))
    registry.remove("c")
    got = [d for name, d in events(request.data) if name == "backend"][2:]
    assert [(d["id"], d["status"], d.get("removed")) for d in got] == [
        ("b", UNHEALTHY, None), ("c", "unknown", None), ("c", "unknown", True)]
    assert got[0]["last_error"] == "GET /v1/models answered 500"


def test_registry_observers_are_told_and_a_failing_one_is_logged() -> None:
    registry = BackendRegistry([BackendConfig(name="a", url="http://a.test")])
    seen: list[tuple[str, bool]] = []

    def broken(backend: Any, removed: bool) -> None:
        raise RuntimeError("observer bug")

    registry.observers += [broken, lambda b, removed: seen.append((b.name, removed))]
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        a = registry.get("a")
        registry.changed(a)
        registry.add(BackendConfig(name="b", url="http://b.test"))
        registry.remove("a")
        registry.changed(a)  # no longer registered: not reported
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert seen == [("a", False), ("b", False), ("a", True)]
    assert sum(1 for e in logged if e.get("log_failure") is not None) == 3


# -- formats shared with the script ----------------------------------------------------------


def test_formats() -> None:
    assert [fmt_ms(v) for v in (None, 0, 0.123, 12.34, 456.7, 1234.5)] == [
        "\u2013", "0", "0.12 ms", "12.3 ms", "457 ms", "1.23 s"]
    assert [fmt_uptime(s) for s in (42, 183, 3720, 90000)] == ["42s", "3m 03s", "1h 02m", "1d 1h"]


# -- over HTTP, in-process gateways ----------------------------------------------------------

EVIL = "<script>window.pwned=1</script>"


class Stream(StreamedBody):
    """Keeps an event stream's bytes; ``leave()`` closes the connection."""

    def names(self) -> list[str]:
        return [name for name, _ in events(self.data)]


async def open_stream(gw: Any, headers: dict[str, Any] | None = None) -> Stream:
    response = await gw.client.get(gw.url + "/v1/events", headers=headers, unbuffered=True)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    stream = Stream()
    response.deliverBody(stream)
    await wait_for(lambda: b"event: stats" in stream.data, what="the first stats event")
    return stream


@pytest_twisted.ensureDeferred
async def test_page_is_server_rendered_and_escapes_what_others_chose(cleanup: Cleanup) -> None:
    mock = start_mock("gpu-<b>1</b>", [EVIL, "llama3:8b"])
    cleanup.append(mock)
    gw = await start_gateway([mock])
    cleanup.append(gw)
    answered = await gw.chat(EVIL)
    assert answered.code == 200
    refused = await gw.chat(EVIL + "-unknown", headers={"x-request-id": "<i>id</i>"})
    assert refused.code == 404
    for path in ("/", "/dashboard"):
        response = await gw.client.get(gw.url + path)
        assert response.code == 200
        headers = response.headers
        assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
        assert headers.getRawHeaders("cache-control") == ["no-store"]
        csp = headers.getRawHeaders("content-security-policy")[0]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        page = (await response.content()).decode()
        assert EVIL not in page and "<b>1</b>" not in page
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
        assert 'data-backend="gpu-&lt;b&gt;1&lt;/b&gt;"' in page
        assert ">healthy<" in page and "llama3:8b" in page  # card, matrix
        assert "<code>&lt;i&gt;id&lt;/i&gt;</code>" in page  # the refused request's row
        assert "no_backend: The model" in page  # its error, shown
        assert len(re.findall(r"<script\b", page)) == 1  # the page's own, nothing else
        assert re.search(r'<script src="/assets/dashboard\.js\?v=[0-9a-f]{16}" defer>', page)
    head = await gw.client.head(gw.url + "/")
    assert head.code == 200


@pytest_twisted.ensureDeferred
async def test_assets_have_their_type_and_caching_headers(cleanup: Cleanup) -> None:
    gw = await start_gateway([], check=False)
    cleanup.append(gw)
    dashboard = gw.gateway.dashboard
    assert dashboard is not None
    for name, kind in (("dashboard.js", "text/javascript; charset=utf-8"),
                       ("dashboard.css", "text/css; charset=utf-8"),
                       ("favicon.svg", "image/svg+xml")):
        asset = dashboard.assets[name]
        response = await gw.client.get(gw.url + asset.url)
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == [kind]
        assert response.headers.getRawHeaders("cache-control") == [
            "public, max-age=31536000, immutable"]
        assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        assert await response.content() == asset.body
        etag = response.headers.getRawHeaders("etag")[0]
        plain = await gw.client.get(gw.url + f"/assets/{name}", headers={"if-none-match": etag})
        assert plain.code == 304
        assert plain.headers.getRawHeaders("cache-control") == ["no-cache"]
        assert await plain.content() == b""
    missing = await gw.client.get(gw.url + "/assets/nothing.js")
    assert missing.code == 404
    assert json.loads(await missing.content())["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_dashboard_false_answers_404_and_records_nothing(cleanup: Cleanup) -> None:
    mock = start_mock("a", ["m"])
    cleanup.append(mock)
    gw = await start_gateway([mock], server={"dashboard": False})
    cleanup.append(gw)
    assert gw.gateway.dashboard is None and len(gw.gateway.site.recorders) == 2
    for path in ("/", "/dashboard", "/v1/events", "/assets/dashboard.js"):
        response = await gw.client.get(gw.url + path)
        assert response.code == 404, path
        assert json.loads(await response.content())["error"]["code"] == "not_found"
    assert (await gw.chat()).code == 200


@pytest_twisted.ensureDeferred
async def test_with_a_metrics_token_the_page_asks_once_and_keeps_a_cookie(
    cleanup: Cleanup,
) -> None:
    gw = await start_gateway([], check=False, server={"metrics_token": "s3cret"})
    cleanup.append(gw)
    form = await gw.client.get(gw.url + "/dashboard")
    assert form.code == 401
    text = (await form.content()).decode()
    assert 'name="token"' in text and 'value="/dashboard"' in text
    assert (await gw.client.get(gw.url + "/v1/events")).code == 401
    bearer = await gw.client.get(gw.url + "/", headers={"authorization": "Bearer s3cret"})
    assert bearer.code == 200

    async def log_in(token: str) -> Any:
        return await gw.client.post(
            gw.url + "/dashboard/login",
            data=f"token={token}&next=/dashboard".encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        )

    wrong = await log_in("guess")
    assert wrong.code == 401 and wrong.headers.getRawHeaders("set-cookie") is None
    assert "not the metrics token" in (await wrong.content()).decode()
    right = await log_in("s3cret")
    assert right.code == 303
    assert right.headers.getRawHeaders("location") == ["/dashboard"]
    [cookie] = right.headers.getRawHeaders("set-cookie")
    value = session_value(b"s3cret").decode()
    assert cookie.startswith(f"{COOKIE.decode()}={value};")
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/", "max-age=2592000"} <= attributes
    assert "s3cret" not in cookie
    with_cookie = {"cookie": f"{COOKIE.decode()}={value}"}
    page = await gw.client.get(gw.url + "/", headers=with_cookie)
    assert page.code == 200 and b'id="cards"' in await page.content()
    stream = await open_stream(gw, headers=with_cookie)
    stream.leave()
    await deadline(stream.ended)
    stale = {"cookie": f"{COOKIE.decode()}={session_value(b'old-token').decode()}"}
    assert (await gw.client.get(gw.url + "/", headers=stale)).code == 401
    # the stats' own rule is unchanged: the cookie does not open them
    assert (await gw.client.get(gw.url + "/v1/stats", headers=with_cookie)).code == 401


@pytest_twisted.ensureDeferred
async def test_events_bring_requests_backends_and_a_gauge(cleanup: Cleanup) -> None:
    mock = start_mock("a", ["m"])
    cleanup.append(mock)
    gw = await start_gateway([mock], health=HealthCheckConfig(timeout_seconds=2.0,
                                                              failure_threshold=1))
    cleanup.append(gw)
    stream = await open_stream(gw)
    assert gw.sample("nexus_dashboard_subscribers") == 1
    metrics = await (await gw.client.get(gw.url + "/metrics")).text()
    assert "\nnexus_dashboard_subscribers 1\n" in metrics
    await gw.chat(headers={"x-request-id": "dash-1"})
    await wait_for(lambda: b'"request_id":"dash-1"' in stream.data, timeout=2.0,
                   what="the request event within 2 s")
    [entry] = [d for name, d in events(stream.data) if name == "request"]
    history = await gw.get_json("/v1/history?limit=1")
    assert {k: v for k, v in entry.items() if k != "finished_at"} == history["data"][0]
    await mock.stop()
    await gw.check_health()
    await wait_for(
        lambda: any(name == "backend" and d["status"] == "unhealthy"
                    for name, d in events(stream.data)),
        timeout=2.0, what="the backend event",
    )
    stream.leave()
    await deadline(stream.ended)
    await wait_for(lambda: gw.sample("nexus_dashboard_subscribers") == 0, what="the gauge")


@pytest_twisted.ensureDeferred
async def test_stopping_the_dashboard_ends_its_streams(cleanup: Cleanup) -> None:
    gw = await start_gateway([], check=False)
    cleanup.append(gw)
    stream = await open_stream(gw)
    dashboard = gw.gateway.dashboard
    assert dashboard is not None
    dashboard.service.startService()
    dashboard.service.stopService()
    await deadline(stream.ended, what="the stream to end")
    assert len(dashboard.live.hub) == 0


@pytest_twisted.ensureDeferred
async def test_dashboard_requests_are_not_request_logged(cleanup: Cleanup) -> None:
    gw = await start_gateway([], check=False)
    cleanup.append(gw)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for path in ("/", "/assets/dashboard.css"):
            assert (await gw.client.get(gw.url + path)).code == 200
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [e for e in logged if e.get("log_namespace") in ("nexus.requests", "nexus.access")] == []
    assert len(gw.gateway.request_log.history) == 0
