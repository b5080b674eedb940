"""Routing end to end: strategies, aliases, fallbacks and retries across real mock backends."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest_twisted

from nexus.config import RoutingConfig
from tests.support import served_by, start_gateway, start_mock


@pytest_twisted.ensureDeferred
async def test_round_robin_spreads_load_evenly(cleanup: list[Any]) -> None:
    mocks = [start_mock(name, ["m"]) for name in ("a", "b", "c")]
    gw = await start_gateway(mocks, routing=RoutingConfig(strategy="round_robin"))
    cleanup += [*mocks, gw]
    seen = Counter()
    for _ in range(30):
        response = await gw.chat()
        assert response.code == 200
        await response.content()
        seen[served_by(response)] += 1
    assert seen == {"a": 10, "b": 10, "c": 10}
    assert [m.stats()["chat_requests"] for m in mocks] == [10, 10, 10]


@pytest_twisted.ensureDeferred
async def test_priority_only_sticks_to_the_preferred_backend(cleanup: list[Any]) -> None:
    mocks = [start_mock(name, ["m"]) for name in ("a", "b")]
    gw = await start_gateway(
        mocks,
        routing=RoutingConfig(strategy="priority_only"),
        backend_options={"a": {"priority": 90}, "b": {"priority": 10}},
    )
    cleanup += [*mocks, gw]
    for _ in range(5):
        response = await gw.chat()
        await response.content()
        assert served_by(response) == "b"


@pytest_twisted.ensureDeferred
async def test_smart_sends_fewer_requests_to_the_slow_backend(cleanup: list[Any]) -> None:
    # "slow" is preferred by priority: only its measured latency can keep requests away.
    # Scores (default weights 50/30/20): slow 95 before its first sample, 75 after it
    # (a 1 s average is the latency term's cap); fast 92.5 - 0.02 * its average in ms.
    # Requests go one at a time, so load plays no part, and fast would need to average
    # 875 ms to lose: no scheduler noise does that to a local mock answering at once.
    slow = start_mock("slow", ["m"], latency_ms=1000)
    fast = start_mock("fast", ["m"])
    gw = await start_gateway(
        [slow, fast], backend_options={"slow": {"priority": 10}, "fast": {"priority": 15}}
    )
    cleanup += [slow, fast, gw]
    seen: Counter[str] = Counter()
    for _ in range(10):
        response = await gw.chat()
        assert response.code == 200
        await response.content()
        seen[served_by(response)] += 1
    # The first request, with no samples yet, is the only one the slow backend gets.
    assert seen == {"slow": 1, "fast": 9}
    assert gw.gateway.registry.get("slow").avg_latency_ms >= 1000


@pytest_twisted.ensureDeferred
async def test_alias_is_forwarded_as_its_target(cleanup: list[Any]) -> None:
    mock = start_mock("a", ["llama3:70b"])
    gw = await start_gateway([mock], routing=RoutingConfig(aliases={"gpt-4": "llama3:70b"}))
    cleanup += [mock, gw]
    response = await gw.chat("gpt-4")
    assert response.code == 200
    assert json.loads(await response.content())["model"] == "llama3:70b"
    assert mock.stats()["last_request"]["body"]["model"] == "llama3:70b"
    assert not response.headers.hasHeader("x-nexus-fallback-model")
    models = await gw.get_json("/v1/models")
    alias = next(m for m in models["data"] if m["id"] == "gpt-4")
    assert alias["alias_of"] == "llama3:70b" and alias["backends"] == ["a"]


@pytest_twisted.ensureDeferred
async def test_fallback_serves_with_header_streaming_too(cleanup: list[Any]) -> None:
    primary = start_mock("primary", ["big"], health_fail=True)
    backup = start_mock("backup", ["small"])
    gw = await start_gateway(
        [primary, backup], routing=RoutingConfig(fallbacks={"big": ("small",)})
    )
    cleanup += [primary, backup, gw]
    response = await gw.chat("big")
    assert response.code == 200
    assert response.headers.getRawHeaders("x-nexus-fallback-model") == ["small"]
    assert served_by(response) == "backup"
    assert backup.stats()["last_request"]["body"]["model"] == "small"
    await response.content()
    response = await gw.chat("big", stream=True)
    assert response.code == 200
    assert response.headers.getRawHeaders("x-nexus-fallback-model") == ["small"]
    assert (await response.content()).endswith(b"data: [DONE]\n\n")
    assert gw.sample("nexus_fallbacks_total", from_model="big", to_model="small") == 2


@pytest_twisted.ensureDeferred
async def test_failing_backend_is_retried_elsewhere_without_client_errors(
    cleanup: list[Any],
) -> None:
    flaky = start_mock("flaky", ["m"])
    steady = start_mock("steady", ["m"])
    gw = await start_gateway(
        [flaky, steady], routing=RoutingConfig(strategy="round_robin", max_retries=2)
    )
    cleanup += [flaky, steady, gw]
    flaky.configure(fail="500")
    codes = Counter()
    for stream in (False, True) * 5:
        response = await gw.chat(stream=stream)
        body = await response.content()
        codes[response.code] += 1
        assert served_by(response) == "steady"
        assert b"error" not in body
    assert codes == {200: 10}
    assert flaky.stats()["chat_requests"] == 5  # round robin put every other request first there
    assert gw.gateway.registry.get("flaky").pending == 0
    # connection refused is retried too
    await flaky.stop()
    response = await gw.chat()
    assert response.code == 200 and served_by(response) == "steady"


@pytest_twisted.ensureDeferred
async def test_all_candidates_failing_gives_502_after_max_retries(cleanup: list[Any]) -> None:
    mocks = [start_mock(name, ["m"], fail="500") for name in ("a", "b", "c", "d")]
    gw = await start_gateway(mocks, routing=RoutingConfig(max_retries=2))
    cleanup += [*mocks, gw]
    response = await gw.chat()
    assert response.code == 502
    assert sum(m.stats()["chat_requests"] for m in mocks) == 3  # 1 + max_retries
    assert gw.sample("nexus_errors_total", error_type="backend_error", model="m") == 1


@pytest_twisted.ensureDeferred
async def test_backend_4xx_is_never_retried(cleanup: list[Any]) -> None:
    mocks = [start_mock(name, ["m"]) for name in ("a", "b")]
    gw = await start_gateway(mocks)
    cleanup += [*mocks, gw]
    response = await gw.chat(temperature=9)
    assert response.code == 400
    assert sum(m.stats()["chat_requests"] for m in mocks) == 1


@pytest_twisted.ensureDeferred
async def test_recovered_backend_is_used_again(cleanup: list[Any]) -> None:
    a = start_mock("a", ["m"])
    b = start_mock("b", ["m"])
    gw = await start_gateway([a, b], routing=RoutingConfig(strategy="round_robin"))
    cleanup += [a, b, gw]
    a.configure(health_fail=True)
    for _ in range(3):
        await gw.check_health()
    for _ in range(4):
        response = await gw.chat()
        await response.content()
        assert served_by(response) == "b"
    a.configure(health_fail=False)
    for _ in range(2):
        await gw.check_health()
    seen = set()
    for _ in range(4):
        response = await gw.chat()
        await response.content()
        seen.add(served_by(response))
    assert seen == {"a", "b"}


@pytest_twisted.ensureDeferred
async def test_capability_needs_filter_backends(cleanup: list[Any]) -> None:
    text = start_mock("text", ["m"])
    vision = start_mock("vision", ["m"])
    gw = await start_gateway(
        [text, vision],
        backend_options={
            "text": {"model_capabilities": {"m": frozenset({"tools"})}},
            "vision": {"model_capabilities": {"m": frozenset({"vision", "tools"})}},
        },
    )
    cleanup += [text, vision, gw]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    for _ in range(3):
        response = await gw.chat(messages=image)
        assert response.code == 200
        assert served_by(response) == "vision"
    response = await gw.chat(response_format={"type": "json_object"})
    assert response.code == 400
    assert "json_mode" in json.loads(await response.content())["error"]["message"]
