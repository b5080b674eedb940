"""Waiting for state without sleeps, and stopping what a test started."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater


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


class Cleanup(list[Any]):
    """Things with a ``stop()`` to call (in reverse order) when a test ends."""

    async def stop_all(self) -> None:
        for item in reversed(self):
            result = item.stop()
            if result is not None:
                await result
