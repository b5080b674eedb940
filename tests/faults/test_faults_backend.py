"""Backend faults through a real ``twistd nexus`` process: what clients see, what /metrics says.

One gateway serves the whole module. Every faulty mock backend serves its own model, so each
request has exactly one candidate (no retry muddles the expected counts), and the backend
``good`` serves the model ``good`` next to them: a request to it, made while the fault is in
progress, must be answered as if nothing happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from nexus.testing import MockBackend
from tests.faults.harness import (
    Backend,
    GatewayProcess,
    Seen,
    Tally,
    assert_metrics_match,
    chat,
    gateway_config,
    many,
)
from tests.support import start_mock, wait_for

FAULTS = (
    "500",
    "503",
    "reset",
    "hang",
    "stall",
    "invalid_json",
    "truncated_sse",
    "huge_length",
    "endless",
    "close",
)

#: Concurrent clients per fault case.
CLIENTS = 4


@attrs.frozen
class Expect:
    """What every client of one fault case sees, and how /metrics counts it."""

    #: HTTP status; 200 for a stream that broke after its first event.
    status: int
    #: ``error.code`` (in the JSON error body, or in the stream's error event).
    code: str | None
    #: ``nexus_errors_total`` ``error_type``.
    error_type: str
    #: The client leaves after this many events (the gateway records 499).
    leave_after: int | None = None


BAD_GATEWAY = Expect(502, "bad_gateway", "backend_error")
TIMEOUT = Expect(504, "gateway_timeout", "timeout")

EXPECTED: dict[tuple[str, bool], Expect | tuple[Expect, ...]] = {
    ("500", False): BAD_GATEWAY,
    ("500", True): BAD_GATEWAY,
    ("503", False): BAD_GATEWAY,
    ("503", True): BAD_GATEWAY,
    # Headers and half the body, then a TCP reset.
    ("reset", False): BAD_GATEWAY,
    # One event reached the client: the stream ends with an error event and [DONE].
    ("reset", True): Expect(200, "bad_gateway", "backend_error"),
    ("hang", False): TIMEOUT,
    ("hang", True): TIMEOUT,
    # Half the body, then silence: the whole answer must come within the timeout.
    ("stall", False): TIMEOUT,
    # Two events, then silence: the idle timeout ends the stream.
    ("stall", True): Expect(200, "gateway_timeout", "timeout"),
    ("invalid_json", False): Expect(502, "bad_gateway", "parse_error"),
    # A 200 whose body is no event stream at all (and no JSON either).
    ("invalid_json", True): Expect(502, "bad_gateway", "parse_error"),
    # Half the announced body, then FIN.
    ("truncated_sse", False): BAD_GATEWAY,
    # One event and half of the next, then a clean end of the body without [DONE].
    ("truncated_sse", True): Expect(200, "bad_gateway", "backend_error"),
    # Content-Length: 2 GiB: refused at once, never buffered.
    ("huge_length", False): BAD_GATEWAY,
    # A 2 GiB JSON body where events were expected, a few bytes, then silence: refused as
    # too large (502), or, read as a stream, no first event within the timeout (504). Both
    # keep the contract; the tally records whichever the client saw.
    ("huge_length", True): (BAD_GATEWAY, TIMEOUT),
    # A JSON body that never ends: the whole answer must come within the timeout.
    ("endless", False): TIMEOUT,
    # The client reads a few events, then leaves.
    ("endless", True): Expect(200, None, "client_disconnect", leave_after=3),
    # Every connection closed unanswered: a kept one's request is sent once more on a new
    # connection (the close may have crossed it), which is closed too.
    ("close", False): BAD_GATEWAY,
    ("close", True): BAD_GATEWAY,
}


@attrs.define
class Fleet:
    gateway: GatewayProcess
    mocks: dict[str, MockBackend]


@pytest_twisted.async_yield_fixture(scope="module")
async def fleet(tmp_path_factory: Any) -> AsyncIterator[Fleet]:
    mocks = {"good": start_mock("good", ["good"])}
    for fault in (*FAULTS, "refused", "pool"):
        mocks[fault] = start_mock(f"b_{fault}", [f"m_{fault}"])
    gateway: GatewayProcess | None = None
    try:
        # The faults are switched on only once the gateway found every backend healthy:
        # ``fail`` touches chat requests only, health probes keep succeeding.
        config = gateway_config([Backend.of(m) for m in mocks.values()], request_timeout=1.0)
        gateway = await GatewayProcess.start(
            tmp_path_factory.mktemp("faults"), config, healthy=len(mocks)
        )
        for fault in FAULTS:
            mocks[fault].configure(fail=fault)
        yield Fleet(gateway, mocks)
        # Each test checks its own part of the log.
        await gateway.stop(whole_log=False)
    finally:
        if gateway is not None:
            gateway.kill()
        for mock in mocks.values():
            await mock.stop()


async def good_request(gateway: GatewayProcess, tally: Tally) -> None:
    """A normal request to the healthy backend: it must not notice the fault next door."""
    seen = await chat(gateway, "good")
    assert seen.status == 200, seen
    assert b"Hello from good" in seen.body
    assert seen.backend == "good"
    tally.add("good", seen)


def check(seen: Seen, expect: Expect, backend: str) -> None:
    """The client saw exactly what the contract promises for this fault."""
    assert seen.backend == backend, seen
    if expect.leave_after is not None:
        assert seen.left and seen.status == 200, seen
        events = seen.body.split(b"\n\n")[: expect.leave_after]
        assert len(events) == expect.leave_after, seen.body
        assert all(e.startswith(b'data: {"id": "chatcmpl-') for e in events), seen.body
        return
    assert not seen.left
    assert seen.status == expect.status, (seen.status, seen.body[:500])
    if expect.status == 200:
        # Events reached the client before the break: a clean end, one error event.
        error = seen.stream_error()
        assert error is not None, seen.body[-500:]
        assert error["type"] == "server_error" and error["code"] == expect.code, error
        assert seen.events()[0].startswith(b'data: {"id": "chatcmpl-'), seen.body[:200]
    else:
        error = seen.error()
        assert error["type"] == "server_error" and error["code"] == expect.code, error
        assert error["param"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest_twisted.ensureDeferred
async def test_backend_fault(fleet: Fleet, fault: str, stream: bool) -> None:
    gateway, mock = fleet.gateway, fleet.mocks[fault]
    expected = EXPECTED[(fault, stream)]
    choices = expected if isinstance(expected, tuple) else (expected,)
    model, backend = f"m_{fault}", f"b_{fault}"
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    disconnects_before = mock.stats()["disconnects"]
    tally = Tally()

    async def faulty() -> None:
        seen = await chat(gateway, model, stream=stream, leave_after=choices[0].leave_after)
        expect = next((e for e in choices if e.status == seen.status), choices[0])
        check(seen, expect, backend)
        tally.add(model, seen, expect.error_type)

    await gatherResults(
        [ensureDeferred(faulty()) for _ in range(CLIENTS)]
        + [ensureDeferred(good_request(gateway, tally))],
        consumeErrors=True,
    )
    # Nothing is left hanging upstream: the gateway closed every connection it gave up on.
    await wait_for(lambda: mock.stats()["in_flight"] == 0, what=f"{backend} has no request open")
    if fault in ("hang", "stall", "endless"):
        # The backend was still answering when the gateway gave up (or the client left):
        # the gateway cancelled the upstream request.
        assert mock.stats()["disconnects"] - disconnects_before == CLIENTS
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    # The gateway is still up and still serves.
    gateway.assert_alive()
    after = Tally()
    before = await gateway.metrics()
    await good_request(gateway, after)
    await assert_metrics_match(gateway, before, after)
    gateway.assert_log_clean(since=log_mark)


@pytest_twisted.ensureDeferred
async def test_backend_refusing_connections(fleet: Fleet) -> None:
    """A stopped backend: 502 while the gateway still believes it healthy, then 503."""
    gateway, mock = fleet.gateway, fleet.mocks["refused"]
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    tally = Tally()
    await mock.stop()

    async def refused(stream: bool) -> None:
        seen = await chat(gateway, "m_refused", stream=stream)
        error = seen.error()
        if seen.status == 502:
            # Still marked healthy: the one attempt found the port closed.
            assert error["code"] == "bad_gateway" and "unreachable" in error["message"]
            assert seen.backend == "b_refused"
            tally.add("m_refused", seen, "backend_error")
        else:
            # The health checks already took it out of rotation.
            assert seen.status == 503 and error["code"] == "service_unavailable", seen
            assert seen.backend == "none"
            tally.add("m_refused", seen, "no_healthy_backend")

    await gatherResults(
        [ensureDeferred(refused(stream)) for stream in (False, True, False, True)]
        + [ensureDeferred(good_request(gateway, tally))],
        consumeErrors=True,
    )

    async def out_of_rotation() -> bool:
        health = await gateway.get_json("/health")
        return bool(health["status"] == "degraded" and health["backends"]["unhealthy"] == 1)

    await wait_for(out_of_rotation, timeout=10, what="b_refused marked unhealthy")
    models = await gateway.get_json("/v1/models")
    assert "m_refused" not in [m["id"] for m in models["data"]]
    for stream in (False, True):
        seen = await chat(gateway, "m_refused", stream=stream)
        assert seen.status == 503 and seen.error()["code"] == "service_unavailable", seen
        tally.add("m_refused", seen, "no_healthy_backend")
    await good_request(gateway, tally)
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)


@pytest_twisted.ensureDeferred
async def test_occasional_500s_under_load_fail_only_their_own_requests(fleet: Fleet) -> None:
    """A backend that is up is never reported unreachable.

    20 clients at a time; before every 4th request the backend is told to answer its next
    call with a 500. Each 500 costs exactly one client a 502 ("answered 500"); no request fails
    in any other way, and every request reached the backend. (A connection the gateway closed
    after a 500 must not go back to its pool for the next request to fail on.)

    Telling the backend again while its last 500 is still pending adds none; the test counts
    the 500s the backend really answered (a pending one is cleared by the call it fails).
    """
    gateway, mock = fleet.gateway, fleet.mocks["pool"]
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    requests_before = mock.stats()["chat_requests"]
    tally = Tally()
    n = 400
    sent = iter(range(n))
    messages: dict[str, int] = {}
    injected = 0

    async def one() -> None:
        nonlocal injected
        i = next(sent)
        if i % 4 == 0:
            if mock.settings.fail is None:
                injected += 1
            mock.configure(fail="500", fail_count=1)
        seen = await chat(gateway, "m_pool", stream=i % 2 == 1)
        if seen.status == 200:
            tally.add("m_pool", seen)
            return
        error = seen.error()
        messages[error["message"]] = messages.get(error["message"], 0) + 1
        tally.add("m_pool", seen, "backend_error")

    await many(n, one, concurrency=20)
    answered_500 = injected - (mock.settings.fail is not None)  # the last may still be pending
    mock.configure(fail=None, fail_count=-1)
    assert answered_500 > 0, "no 500 was injected"
    assert messages == {"Backend 'b_pool' answered 500.": answered_500}, (messages, answered_500)
    assert mock.stats()["chat_requests"] - requests_before == n
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)
