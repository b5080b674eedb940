"""A backend whose health checks flap (success, failure, success, ...) on every probe."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted

from tests.faults.harness import Backend, GatewayProcess, Tally, assert_metrics_match, chat
from tests.faults.harness import gateway_config as config_for
from tests.support import Cleanup, start_mock, wait_for

StartGateway = Callable[..., Awaitable[GatewayProcess]]


async def flapping_fleet(
    start_gateway: StartGateway, cleanup: Cleanup, **health: Any
) -> tuple[GatewayProcess, Any]:
    good = start_mock("good", ["good"])
    flappy = start_mock("flappy", ["m_flap"])
    cleanup += [good, flappy]
    gateway = await start_gateway(
        config_for([Backend.of(good), Backend.of(flappy)], **health), healthy=2
    )
    flappy.configure(flap=True)
    return gateway, flappy


@pytest_twisted.ensureDeferred
async def test_flapping_backend_goes_in_and_out_of_rotation(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    """Thresholds of 1: each probe flips the backend; clients get 200 or a clean 503."""
    gateway, flappy = await flapping_fleet(
        start_gateway, cleanup, interval=0.1, failure_threshold=1, recovery_threshold=1
    )
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    tally = Tally()
    statuses: set[int] = set()
    fleet_states: set[str] = set()
    rounds = 0

    async def one_round() -> bool:
        nonlocal rounds
        rounds += 1
        seen = await chat(gateway, "m_flap", stream=rounds % 2 == 0)
        statuses.add(seen.status)
        if seen.status == 200:
            assert seen.backend == "flappy"
            assert b"Hello" in seen.body and b"error" not in seen.body
            tally.add("m_flap", seen)
        else:
            assert seen.status == 503, (seen.status, seen.body)
            error = seen.error()
            assert error["code"] == "service_unavailable" and error["type"] == "server_error"
            assert seen.backend == "none"
            tally.add("m_flap", seen, "no_healthy_backend")
        good = await chat(gateway, "good")
        assert good.status == 200 and good.backend == "good", good
        tally.add("good", good)
        health = await gateway.health()
        fleet_states.add(health["status"])
        return statuses == {200, 503} and fleet_states == {"healthy", "degraded"}

    await wait_for(one_round, timeout=20, what="both 200 and 503 from the flapping backend")
    assert flappy.stats()["health_checks"] >= 2
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)


@pytest_twisted.ensureDeferred
async def test_default_thresholds_keep_a_flapping_backend_in_rotation(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    """With failure_threshold 3 a probe failing every other time never takes it out."""
    gateway, flappy = await flapping_fleet(
        start_gateway, cleanup, interval=0.1, failure_threshold=3, recovery_threshold=2
    )
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    probes_before = flappy.stats()["health_checks"]
    tally = Tally()

    async def one_round() -> bool:
        for model, stream in (("m_flap", False), ("m_flap", True), ("good", False)):
            seen = await chat(gateway, model, stream=stream)
            assert seen.status == 200, (model, seen.status, seen.body)
            tally.add(model, seen)
        health = await gateway.health()
        assert health["status"] == "healthy", health
        # Ten probes: five of them failed, never three in a row.
        return bool(flappy.stats()["health_checks"] - probes_before >= 10)

    await wait_for(one_round, timeout=20, what="ten health probes of the flapping backend")
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)
