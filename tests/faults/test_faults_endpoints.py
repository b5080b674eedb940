"""Embeddings and legacy completions through a real ``twistd nexus``: routed, retried, timed
and counted like chat, and /metrics, /v1/stats and the request log tell the same story."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted

from tests.faults.harness import Backend, GatewayProcess, gateway_config, post
from tests.support import Cleanup, start_mock, wait_for

StartGateway = Callable[..., Awaitable[GatewayProcess]]


def body(path: str, model: str, stream: bool = False) -> bytes:
    if path == "/v1/embeddings":
        return json.dumps({"model": model, "input": ["a", "b"]}).encode()
    return json.dumps({"model": model, "prompt": "hi", "stream": stream}).encode()


@pytest_twisted.ensureDeferred
async def test_embeddings_and_completions_through_twistd(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    flaky = start_mock("a_flaky", ["m"], fail="500")
    steady = start_mock("b_steady", ["m", "small"])
    hanging = start_mock("c_hang", ["slow"], fail="hang")
    paced = start_mock("d_paced", ["p"], stream_delay_ms=200)
    cleanup += [flaky, steady, hanging, paced]
    config = gateway_config(
        [Backend.of(flaky, 1), Backend.of(steady, 2), Backend.of(hanging), Backend.of(paced)],
        strategy="priority_only", max_retries=1, request_timeout=0.5,
    ) + '[routing.aliases]\nalias = "m"\n[routing.fallbacks]\ngone = ["small"]\n'
    gateway = await start_gateway(config, healthy=4)
    expected: Counter[tuple[str, str, str]] = Counter()
    for path in ("/v1/embeddings", "/v1/completions"):
        for model, status, backend in (
            ("m", 200, "b_steady"),  # 500 on a_flaky, retried on b_steady
            ("alias", 200, "b_steady"),
            ("gone", 200, "b_steady"),  # a fallback serves
            ("slow", 504, "c_hang"),
        ):
            seen = await post(gateway, path, body(path, model))
            assert (seen.status, seen.backend) == (status, backend), seen
            label = "gone" if model == "gone" else model
            expected[(label, backend, str(status))] += 1
    seen = await post(gateway, "/v1/completions", body("/v1/completions", "p", stream=True),
                      leave_after=1)
    assert seen.left
    expected[("p", "d_paced", "499")] += 1

    events: list[dict[str, Any]] = []

    async def all_recorded() -> bool:
        events[:] = (await gateway.get_json("/v1/history"))["data"]
        return len(events) == 9

    await wait_for(all_recorded, what="9 request events")
    assert Counter(e["endpoint"] for e in events) == {"embeddings": 4, "completions": 5}
    told = Counter(
        (e["model"], e["backend"], str(e["status_code"])) for e in events
    )
    assert told == expected
    metrics = await gateway.metrics()
    assert {k: v for k, v in metrics.requests().items() if v} == expected
    stats = await gateway.get_json("/v1/stats")
    assert stats["requests"]["total"] == 9 and stats["requests"]["success"] == 6
    assert metrics.value("nexus_fallbacks_total", from_model="gone", to_model="small") == 2
    await gateway.assert_no_pending()
