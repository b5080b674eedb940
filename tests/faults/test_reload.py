"""Configuration reload on SIGHUP (contract section 11) against a real ``twistd nexus``."""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable

import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.faults.harness import Backend, GatewayProcess, chat, gateway_config, post
from tests.support import Cleanup, start_mock, wait_for

StartGateway = Callable[..., Awaitable[GatewayProcess]]


def reload(gateway: GatewayProcess, config: str) -> int:
    """Write the new file, send SIGHUP; returns where the log was before (for its lines)."""
    since = gateway.log_size()
    (gateway.log_path.parent / "nexus.toml").write_text(config)
    gateway.process.send_signal(signal.SIGHUP)
    return since


async def reload_line(gateway: GatewayProcess, since: int, word: str = "reload:") -> str:
    def logged() -> bool:
        return word in gateway.log()[since:]

    await wait_for(logged, timeout=10, what="the reload in the log")
    [line] = [line for line in gateway.log()[since:].splitlines() if word in line]
    return line


@pytest_twisted.ensureDeferred
async def test_reload_in_the_middle_of_50_streams(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    streams = start_mock("a_streams", ["m"], stream_chunks=20, stream_delay_ms=40)
    newcomer = start_mock("b_new", ["n"])
    cleanup += [streams, newcomer]
    before = gateway_config([Backend.of(streams)], request_timeout=5.0)
    gateway = await start_gateway(before, healthy=1)

    flowing = [ensureDeferred(chat(gateway, "m", stream=True)) for _ in range(50)]
    await wait_for(lambda: streams.stats()["in_flight"] == 50, what="50 streams flowing")
    after = gateway_config(
        [Backend.of(streams, priority=10), Backend.of(newcomer)],
        request_timeout=5.0, strategy="priority_only",
    ) + '[routing.aliases]\nnewest = "n"\n'
    since = reload(gateway, after)
    seen = await gatherResults(flowing)
    # every stream finished whole: the reload disturbed nothing in flight
    for one in seen:
        assert one.status == 200 and one.stream_error() is None
        assert sum(b'"content"' in e for e in one.events()) >= 20
    line = await reload_line(gateway, since)
    assert "backend b_new added" in line and "backend a_streams changed" in line
    assert "routing" in line
    # the new configuration serves: a new backend, an alias, the new strategy
    await wait_for(lambda: ensureDeferred(_healthy(gateway, 2)), what="b_new healthy")
    assert (await chat(gateway, "newest")).backend == "b_new"
    metrics = await gateway.metrics()
    assert metrics.requests()[("m", "a_streams", "200")] == 50
    assert metrics.requests()[("newest", "b_new", "200")] == 1
    await gateway.assert_no_pending()
    await gateway.stop()


async def _healthy(gateway: GatewayProcess, n: int) -> bool:
    return bool((await gateway.health())["backends"]["healthy"] == n)


@pytest_twisted.ensureDeferred
async def test_a_bad_file_changes_nothing_and_keys_and_removals_apply(
    start_gateway: StartGateway, cleanup: Cleanup
) -> None:
    one = start_mock("one", ["m"])
    two = start_mock("two", ["t"])
    cleanup += [one, two]
    config = gateway_config([Backend.of(one), Backend.of(two)])
    gateway = await start_gateway(config, healthy=2)

    since = reload(gateway, config + "[routing\nbroken = ")
    line = await reload_line(gateway, since)
    assert "nothing changed" in line and "nexus.toml" in line and "#error]" in line
    assert len([x for x in gateway.log()[since:].splitlines() if x.strip()]) == 1
    assert (await chat(gateway, "m")).status == 200  # still the old configuration

    # keys and a removed backend take effect; a listen change needs a restart
    keyed = gateway_config([Backend.of(one)]).replace(
        'listen = "tcp:0:interface=127.0.0.1"',
        'listen = "tcp:0:interface=127.0.0.2"\napi_keys = ["sk-new"]',
    ) + '[logging]\nlevel = "warn"\n'

    since = reload(gateway, keyed)
    line = await reload_line(gateway, since, "server.listen changed")
    assert line.endswith("takes effect after a restart")
    assert "backend two removed" not in gateway.log()[since:]  # an info line: level is warn
    quiet_from = gateway.log_size()
    assert (await chat(gateway, "m")).status == 401
    assert "nexus.requests" not in gateway.log()[quiet_from:]  # the level is now warn
    seen = await post(gateway, "/v1/models", b"")
    assert seen.status in (401, 405)
    health = await gateway.health()
    assert [b["id"] for b in health["fleet"]] == ["one"]
    # the gateway still answers on its port: the listen change waits for a restart
    code, body = await gateway.get("/health")
    assert code == 200 and json.loads(body)["backends"]["total"] == 1
    # back to info: the log follows again
    since = reload(gateway, keyed.replace('level = "warn"', 'level = "info"'))
    assert "logging" in await reload_line(gateway, since)
    await gateway.stop(whole_log=False)
