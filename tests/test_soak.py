"""Soak: many mixed requests with injected faults through a real ``twistd nexus`` process.

The gateway must neither grow (RSS, open file descriptors) nor miscount over a long run.
``NEXUS_SOAK_REQUESTS`` sets how many requests are measured (default 3,000, a CI-sized run);
the long setting is 100,000::

    NEXUS_SOAK_REQUESTS=100000 NEXUS_SOAK_SECONDS=900 pytest tests/test_soak.py -s

``NEXUS_SOAK_SECONDS`` bounds the run's time as well (default 90): past it no new request is
started, and everything that did run is checked the same way. The figures are printed as one
``nexus-soak:`` line (visible with ``pytest -s``).

The mix, for request number i:

- every 25th: a stream from an endless backend that the client leaves after two events (499);
- every 5th (offset 2): the model ``flaky``, one backend; every other one of these is failed
  with a 500 by the backend (the client gets 502, nothing to retry on);
- the rest: the model ``soak`` on ``primary`` (preferred) and ``secondary``; every 10th of all
  requests makes ``primary`` answer its next call with a 500, which the gateway retries on
  ``secondary`` (the client gets a 200 from ``secondary``);
- every other request streams.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.web.client import Agent, HTTPConnectionPool

from tests.faults.harness import (
    Backend,
    GatewayProcess,
    Seen,
    Tally,
    assert_metrics_match,
    chat,
    gateway_config,
)
from tests.support import DeadlineAgent, start_mock, wait_for

REQUESTS = int(os.environ.get("NEXUS_SOAK_REQUESTS", "3000"))
SECONDS = float(os.environ.get("NEXUS_SOAK_SECONDS", "90"))
CONCURRENCY = 32
#: Allowed RSS growth between the end of the warm-up and the end of the run.
RSS_GROWTH_LIMIT_KB = 10 * 1024
#: Open fds allowed above the warm-up level: idle keep-alive connections in the pool.
FD_SLACK = 16


def classify(i: int) -> tuple[str, bool, int | None]:
    """(model, stream, leave after this many events) of request number ``i``."""
    if i % 25 == 0:
        return "slow", True, 2
    stream = i % 2 == 1
    if i % 5 == 2:
        return "flaky", stream, None
    return "soak", stream, None


class Soak:
    """Runs the request mix against one gateway and keeps the clients' tally."""

    def __init__(self, gateway: GatewayProcess, mocks: dict[str, Any]) -> None:
        self.gateway = gateway
        self.mocks = mocks
        self.tally = Tally()
        self.outcomes: dict[str, int] = {}
        self._new_client()

    def _new_client(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = CONCURRENCY
        self.agent = DeadlineAgent(Agent(reactor, pool=self.pool))

    async def close_client(self) -> None:
        """Close the clients' keep-alive connections (fds are compared without them)."""
        await self.pool.closeCachedConnections()
        self._new_client()

    async def run(self, n: int, deadline: float) -> int:
        """Send up to ``n`` requests, CONCURRENCY at a time; return how many were sent."""
        counter = itertools.count()
        done = 0

        async def worker() -> None:
            nonlocal done
            while True:
                i = next(counter)
                if i >= n or time.monotonic() > deadline:
                    return
                await self.one(i)
                done += 1

        await gatherResults(
            [ensureDeferred(worker()) for _ in range(CONCURRENCY)], consumeErrors=True
        )
        return done

    async def one(self, i: int) -> None:
        model, stream, leave_after = classify(i)
        if model == "soak" and i % 10 == 0:
            self.mocks["primary"].configure(fail="500", fail_count=1)
        if model == "flaky" and (i // 5) % 2 == 0:
            self.mocks["flaky"].configure(fail="500", fail_count=1)
        seen = await chat(self.gateway, model, stream, leave_after, agent=self.agent)
        error_type = self.check(model, stream, seen)
        self.tally.add(model, seen, error_type)
        key = f"{model}:{seen.backend}:{seen.recorded_status}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    @staticmethod
    def check(model: str, stream: bool, seen: Seen) -> str | None:
        """Check what the client saw; return the error type the gateway must have counted."""
        if model == "slow":
            assert seen.left and seen.status == 200 and seen.backend == "slow", seen
            return None  # client_disconnect, added by the tally
        assert not seen.left
        if model == "flaky" and seen.status == 502:
            error = seen.error()
            assert seen.backend == "flaky" and error["code"] == "bad_gateway", seen
            # Only the injected 500s fail a request: the backend is never "unreachable".
            assert error["message"] == "Backend 'flaky' answered 500.", error
            return "backend_error"
        assert seen.status == 200, (model, seen.status, seen.body[:300])
        if model == "soak":
            assert seen.backend in ("primary", "secondary"), seen
        else:
            assert seen.backend == "flaky", seen
        if stream:
            assert seen.stream_error() is None, seen.body[-300:]
            assert b'"content": "Hello"' in seen.body
        else:
            answer = json.loads(seen.body)
            assert answer["choices"][0]["message"]["content"] == f"Hello from {seen.backend}"
        return None


async def settled_fds(gateway: GatewayProcess) -> int:
    """The gateway's open fd count once it stopped changing (closed connections noticed)."""
    readings: list[int] = []

    def steady() -> bool:
        readings.append(gateway.fd_count())
        return len(readings) >= 10 and len(set(readings[-10:])) == 1

    await wait_for(steady, timeout=20, what="the gateway's fd count to settle")
    return readings[-1]


@pytest_twisted.ensureDeferred
async def test_soak(tmp_path: Path) -> None:
    mocks = {
        "primary": start_mock("primary", ["soak"]),
        "secondary": start_mock("secondary", ["soak"]),
        "flaky": start_mock("flaky", ["flaky"]),
        "slow": start_mock("slow", ["slow"], fail="endless", stream_delay_ms=20),
    }
    backends = [
        Backend.of(mocks["primary"], priority=1),
        Backend.of(mocks["secondary"], priority=2),
        Backend.of(mocks["flaky"]),
        Backend.of(mocks["slow"]),
    ]
    # Health checks keep every backend in rotation: a busy machine slowing a probe down must
    # not turn the soak's expected 200s into 503s.
    config = gateway_config(
        backends,
        request_timeout=5.0,
        interval=1.0,
        health_timeout=10.0,
        failure_threshold=1000,
        max_retries=1,
        strategy="priority_only",
    )
    gateway = await GatewayProcess.start(tmp_path, config, healthy=len(backends))
    try:
        started = time.monotonic()
        deadline = started + SECONDS
        soak = Soak(gateway, mocks)
        warm_up = max(300, min(REQUESTS // 10, 5000))
        await soak.run(warm_up, deadline)
        await soak.close_client()
        warm_rss, warm_fds = gateway.rss_kb(), await settled_fds(gateway)
        before = await gateway.metrics()
        stats_before = (await gateway.get_json("/v1/stats"))["requests"]["total"]
        soak.tally = Tally()
        soak.outcomes = {}
        measured_from = time.monotonic()
        sent = await soak.run(REQUESTS, deadline)
        elapsed = time.monotonic() - measured_from
        await soak.close_client()
        for mock in mocks.values():
            await wait_for(lambda m=mock: m.stats()["in_flight"] == 0, what="mocks idle")
        await gateway.assert_no_pending()
        await assert_metrics_match(gateway, before, soak.tally)
        stats_after = (await gateway.get_json("/v1/stats"))["requests"]["total"]
        assert stats_after - stats_before == sent
        # the request history is a ring: the last 100 events, whatever ran before
        history = (await gateway.get_json("/v1/history"))["data"]
        assert len(history) == min(100, warm_up + sent)
        end_rss, end_fds = gateway.rss_kb(), await settled_fds(gateway)
        line = (
            f"nexus-soak: requests={sent}/{REQUESTS} seconds={elapsed:.1f} "
            f"rate={sent / max(elapsed, 1e-9):.0f}/s warm_up={warm_up} "
            f"rss_kb={warm_rss}->{end_rss} ({end_rss - warm_rss:+d}) "
            f"fds={warm_fds}->{end_fds} ({end_fds - warm_fds:+d}) "
            f"outcomes={json.dumps(dict(sorted(soak.outcomes.items())), separators=(',', ':'))}"
        )
        print("\n" + line)
        report = os.environ.get("NEXUS_SOAK_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(line + "\n")
        assert sent > 0
        assert end_rss - warm_rss < RSS_GROWTH_LIMIT_KB, line
        assert end_fds <= warm_fds + FD_SLACK, line
        # Every kind of outcome happened, so the run exercised what it claims to.
        if sent >= 100:
            assert {"slow:slow:499", "flaky:flaky:502", "flaky:flaky:200",
                    "soak:primary:200", "soak:secondary:200"} <= set(soak.outcomes), line
        await gateway.stop()
    finally:
        gateway.kill()
        for mock in mocks.values():
            await mock.stop()
