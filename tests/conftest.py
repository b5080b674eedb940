"""Shared test configuration."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest_twisted
from hypothesis import HealthCheck, settings

from tests.support import Cleanup

settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest_twisted.async_yield_fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    """Things with a ``stop()`` (mocks, gateways) stopped in reverse order after the test."""
    items = Cleanup()
    yield items
    await items.stop_all()
