"""Fixtures of the fault-injection suite: real ``twistd nexus`` processes, in-process mocks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.faults.harness import GatewayProcess


@pytest_twisted.async_yield_fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    """Start gateway processes; each is stopped with SIGTERM at the end and must stop cleanly."""
    started: list[GatewayProcess] = []

    async def start(config_text: str, healthy: int, name: str = "gateway") -> GatewayProcess:
        gateway = await GatewayProcess.start(tmp_path / name, config_text, healthy=healthy)
        started.append(gateway)
        return gateway

    yield start
    await stop_all(started)


async def stop_all(gateways: list[Any]) -> None:
    """Stop every gateway (SIGTERM, clean exit asserted); kill leftovers if one fails."""
    try:
        for gateway in gateways:
            await gateway.stop()
    finally:
        for gateway in gateways:
            gateway.kill()
