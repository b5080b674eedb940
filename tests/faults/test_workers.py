"""Worker mode (contract section 12) against a real ``twistd nexus`` with 2 workers.

The gateway runs as a supervisor and two worker processes; the clients open a fresh
connection per request (the harness's agent keeps none), so the kernel spreads them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.faults.harness import Backend, GatewayProcess, chat, gateway_config, many
from tests.support import Cleanup, start_mock, wait_for

StartGateway = Callable[..., Awaitable[GatewayProcess]]

_SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def with_workers(config: str, workers: int = 2) -> str:
    return config.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1)


def serving(gateway: GatewayProcess, since: int = 0) -> dict[int, int]:
    """Worker number -> pid, from the log's "worker N (pid P) serving" lines (the last wins)."""
    return {int(n): int(pid) for n, pid in _SERVING.findall(gateway.log()[since:])}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def total_requests(gateway: GatewayProcess) -> tuple[int, int, int]:
    """``nexus_requests_total`` summed, ``/v1/stats`` total and ``/v1/history`` length."""
    metrics = await gateway.metrics()
    stats = await gateway.get_json("/v1/stats")
    history = await gateway.get_json("/v1/history")
    return sum(metrics.requests().values()), stats["requests"]["total"], len(history["data"])


async def start_two(start_gateway: StartGateway, cleanup: Cleanup, **mock: Any) -> tuple[
    GatewayProcess, Any
]:
    backend = start_mock("alpha", ["m"], **mock)
    cleanup.append(backend)
    config = with_workers(gateway_config([Backend.of(backend)], request_timeout=5.0))
    gateway = await start_gateway(config, healthy=1)
    await wait_for(lambda: len(serving(gateway)) == 2, what="2 workers serving")
    return gateway, backend


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_one_socket_and_every_scrape_is_exact(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    gateway, backend = await start_two(start_gateway, cleanup)
    pids = serving(gateway)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2

    seen = await many(60, lambda: chat(gateway, "m"), concurrency=8)
    assert [s.status for s in seen] == [200] * 60
    # Both workers served (each event says which), and every request is in the history once.
    history = (await gateway.get_json("/v1/history"))["data"]
    assert len(history) == 60
    assert len({e["request_id"] for e in history}) == 60
    assert {e["worker"] for e in history} == {1, 2}
    # Every scrape, on a fresh connection to whichever worker, shows exactly 60.
    for _ in range(10):
        assert await total_requests(gateway) == (60, 60, 60)
    # Right after each request, the next scrape already counts it: no lag between workers.
    for n in range(61, 71):
        assert (await chat(gateway, "m")).status == 200
        assert await total_requests(gateway) == (n, n, n)
    metrics = await gateway.metrics()
    assert metrics.requests() == {("m", "alpha", "200"): 70}
    assert metrics.pending() == {"alpha": 0}
    stats = await gateway.get_json("/v1/stats")
    assert stats["backends"][0]["requests"] == 70
    health = [await gateway.health() for _ in range(6)]
    assert {h["status"] for h in health} == {"healthy"}
    assert {h["fleet"][0]["status"] for h in health} == {"healthy"}
    assert backend.stats()["chat_requests"] == 70


@pytest_twisted.ensureDeferred
async def test_the_fleet_is_checked_once_per_interval_not_once_per_worker(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    gateway, backend = await start_two(start_gateway, cleanup)
    await wait_for(lambda: backend.stats()["health_checks"] >= 10, what="10 health checks")
    # Every check the backend saw is the supervisor's: each one it answered is counted once
    # in nexus_backend_latency_seconds, which every worker shows. A poller in each worker
    # as well would make the backend see about three times what the gateway counts.
    for _ in range(5):
        seen_before = backend.stats()["health_checks"]
        counted = (await gateway.metrics()).value(
            "nexus_backend_latency_seconds_count", backend="alpha"
        )
        seen_after = backend.stats()["health_checks"]
        assert seen_before - 1 <= counted <= seen_after, (seen_before, counted, seen_after)


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_replaced_and_its_counts_are_kept(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    gateway, _ = await start_two(start_gateway, cleanup)
    seen = await many(40, lambda: chat(gateway, "m"), concurrency=8)
    assert [s.status for s in seen] == [200] * 40
    history = (await gateway.get_json("/v1/history"))["data"]
    served_by_1 = sum(1 for e in history if e["worker"] == 1)
    assert served_by_1 > 0

    since = gateway.log_size()
    victim = serving(gateway)[1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    # Requests keep succeeding meanwhile (the other worker accepts on the same socket).
    during = await many(20, lambda: chat(gateway, "m"), concurrency=4)
    assert [s.status for s in during] == [200] * 20
    # Contract: replaced within 2 s (measured 0.6-0.7 s: docs/performance.md); the deadline
    # here leaves room for a loaded test machine.
    await wait_for(lambda: 1 in serving(gateway, since), timeout=5, what="worker 1 replaced")
    print(f"worker replaced and serving {time.monotonic() - killed:.2f} s after SIGKILL")
    new_pid = serving(gateway, since)[1]
    assert new_pid != victim and alive(new_pid) and not alive(victim)
    assert f"worker 1 (pid {victim}) killed by signal 9; starting a new one" in gateway.log()
    # The dead worker's requests are still counted, by every worker, the new one included.
    for _ in range(8):
        assert await total_requests(gateway) == (60, 60, 60)
    after = await many(30, lambda: chat(gateway, "m"), concurrency=8)
    assert [s.status for s in after] == [200] * 30
    history = (await gateway.get_json("/v1/history"))["data"]
    assert {e["worker"] for e in history[:30]} == {1, 2}  # the new worker 1 serves too
    for _ in range(8):
        assert await total_requests(gateway) == (90, 90, 90)
    # The death is logged as an error; from there on the log is clean, up to a clean stop.
    gateway.assert_log_clean(since=gateway.log().find("starting a new one") + 40)
    await gateway.stop(whole_log=False)


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_every_worker(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    gateway, backend = await start_two(
        start_gateway, cleanup, stream_chunks=15, stream_delay_ms=60
    )
    workers = serving(gateway)
    streams = [ensureDeferred(chat(gateway, "m", stream=True)) for _ in range(12)]
    await wait_for(lambda: backend.stats()["in_flight"] == 12, what="12 streams flowing")
    since = gateway.log_size()
    gateway.process.send_signal(signal.SIGTERM)
    gateway.stopped = True
    seen = await gatherResults(streams)
    for one in seen:  # every stream finished whole, on both workers
        assert one.status == 200 and one.stream_error() is None
        assert sum(b'"content"' in e for e in one.events()) >= 15
    await wait_for(lambda: gateway.process.poll() is not None, timeout=30, what="twistd exit")
    assert gateway.process.returncode in (0, -signal.SIGTERM)
    log = gateway.log()
    assert "Server Shut Down." in log
    assert not any(alive(pid) for pid in workers.values())
    assert "starting a new one" not in log[since:]  # stopping workers are not replaced
    gateway.assert_log_clean(since)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_every_worker(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    gateway, backend = await start_two(start_gateway, cleanup)
    newcomer = start_mock("beta", ["n"])
    cleanup.append(newcomer)
    since = gateway.log_size()
    config = with_workers(gateway_config(
        [Backend.of(backend), Backend.of(newcomer)], request_timeout=5.0
    )) + '[routing.aliases]\nnewest = "n"\n'
    (gateway.log_path.parent / "nexus.toml").write_text(config)
    gateway.process.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        return gateway.log()[since:].count("reload:") >= 3  # the supervisor and 2 workers

    await wait_for(reloaded, timeout=10, what="3 reload lines")

    async def new_backend_healthy() -> bool:
        return bool((await gateway.health())["backends"]["healthy"] == 2)

    await wait_for(new_backend_healthy, what="beta healthy")
    # The new alias and backend serve on both workers.
    seen = await many(40, lambda: chat(gateway, "newest"), concurrency=8)
    assert [s.status for s in seen] == [200] * 40
    assert {s.backend for s in seen} == {"beta"}
    history = (await gateway.get_json("/v1/history"))["data"]
    assert {e["worker"] for e in history if e["model"] == "newest"} == {1, 2}
    lines = [line for line in gateway.log()[since:].splitlines() if "reload:" in line]
    assert len(lines) == 3, lines
    assert any("backend beta added" in line for line in lines)  # the supervisor's fleet


@pytest_twisted.ensureDeferred
async def test_dashboard_events_and_pending_cover_every_worker(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    from tests.support import StreamedBody

    gateway, backend = await start_two(  # streams of 4 s: past a dashboard tick (2 s)
        start_gateway, cleanup, stream_chunks=80, stream_delay_ms=50
    )
    # Two event streams: with one socket per worker they may land on either; whichever
    # worker holds them, each sees every request, served by either worker.
    streams = []
    for _ in range(2):
        response = await gateway.agent.request(b"GET", (gateway.url + "/v1/events").encode())
        assert response.code == 200
        body = StreamedBody()
        response.deliverBody(body)
        streams.append(body)
    seen = await many(30, lambda: chat(gateway, "m"), concurrency=6)
    ids = {s.headers.getRawHeaders(b"x-request-id")[0] for s in seen}  # type: ignore[index]
    history = (await gateway.get_json("/v1/history"))["data"]
    assert {e["worker"] for e in history} == {1, 2}

    def every_request_shown() -> bool:
        return all(all(i in body.data for i in ids) for body in streams)

    await wait_for(every_request_shown, timeout=5, what="30 request events in both streams")
    for body in streams:
        body.leave()
    # Requests in flight on both workers: nexus_pending_requests is their sum.
    flowing = [ensureDeferred(chat(gateway, "m", stream=True)) for _ in range(10)]
    await wait_for(lambda: backend.stats()["in_flight"] == 10, what="10 streams flowing")
    for _ in range(4):
        assert (await gateway.metrics()).pending() == {"alpha": 10}
        stats = await gateway.get_json("/v1/stats")
        assert stats["backends"][0]["pending"] == 10
    # ...and so do the dashboard's stats events (every 2 s), whichever worker sends them.
    response = await gateway.agent.request(b"GET", (gateway.url + "/v1/events").encode())
    live = StreamedBody()
    response.deliverBody(live)

    def ticked_pending() -> list[int]:
        return [
            json.loads(chunk.split(b"data: ", 1)[1])["backends"][0]["pending"]
            for chunk in live.data.split(b"\n\n")
            if chunk.startswith(b"event: stats")
        ]

    await wait_for(lambda: len(ticked_pending()) >= 2, timeout=5, what="a stats event tick")
    assert ticked_pending()[1] == 10, ticked_pending()
    done = await gatherResults(flowing)
    assert [s.status for s in done] == [200] * 10
    # No read in between: the ticks themselves take in the other worker's count, now 0.
    await wait_for(lambda: ticked_pending()[-1] == 0, timeout=5, what="a tick with 0 pending")
    live.leave()
    await gateway.assert_no_pending()


@pytest_twisted.ensureDeferred
async def test_workers_do_not_outlive_their_supervisor(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    import socket

    gateway, _ = await start_two(start_gateway, cleanup)
    workers = serving(gateway)
    assert (await chat(gateway, "m")).status == 200
    gateway.kill()  # SIGKILL: no drain, no goodbye
    gateway.stopped = True
    await wait_for(lambda: not any(alive(pid) for pid in workers.values()), timeout=10,
                   what="the workers to end with their supervisor")
    with socket.socket() as probe:  # and nothing listens on the port any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        probe.bind(("127.0.0.1", gateway.port))
