"""Health polling: the status state machine and discovery, driven by a Clock."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from nexus.config import BackendConfig, HealthCheckConfig
from nexus.health import HealthPoller
from nexus.registry import HEALTHY, UNHEALTHY, UNKNOWN, BackendRegistry, format_timestamp


class Fleet(Resource):
    """Answers every probe according to ``behaviour[host]``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.behaviour: dict[str, str] = {}
        self.models: dict[str, list[str]] = {}
        self.paths: list[tuple[str, bytes]] = []
        self.auth: dict[str, bytes | None] = {}
        #: Requests answered later by the test ("hold").
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        host = request.getRequestHostname().decode()
        self.paths.append((host, request.path))
        self.auth[host] = request.getHeader(b"authorization")
        how = self.behaviour.get(host, "ok")
        if how == "hang":
            return NOT_DONE_YET
        if how == "hold":
            self.held.append(request)
            return NOT_DONE_YET
        if how == "fail":
            request.setResponseCode(500)
            return b"{}"
        if how == "garbage":
            return b"<html>"
        models = self.models.get(host, ["m"])
        if request.path == b"/api/tags":
            return json.dumps({"models": [{"name": m} for m in models]}).encode()
        if request.path == b"/health":
            return json.dumps({"status": "ok" if how == "ok" else "loading"}).encode()
        return json.dumps({"data": [{"id": m} for m in models]}).encode()


def make(
    *backends: BackendConfig,
    environ: dict[str, str] | None = None,
    wall_clock: Callable[[], float] = time.time,
    **health: Any,
) -> tuple[HealthPoller, BackendRegistry, Fleet, Clock, list[tuple[str, float]]]:
    fleet = Fleet()
    registry = BackendRegistry(backends)
    clock = Clock()
    latencies: list[tuple[str, float]] = []
    config = HealthCheckConfig(**{"timeout_seconds": 5.0, **health})
    poller = HealthPoller(
        registry,
        config,
        StubTreq(fleet),
        clock,
        lambda b, s: latencies.append((b, s)),
        environ=environ or {},
        wall_clock=wall_clock,
    )
    return poller, registry, fleet, clock, latencies


def run_round(poller: HealthPoller, clock: Clock) -> list[object]:
    done: list[object] = []
    poller.check_all().addCallback(done.append)
    return done


def test_first_check_decides_then_thresholds_apply() -> None:
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="a", url="http://a.test"), failure_threshold=3, recovery_threshold=2
    )
    a = registry.get("a")
    assert a.status == UNKNOWN
    run_round(poller, clock)
    assert a.status == HEALTHY
    fleet.behaviour["a.test"] = "fail"
    for expected in (HEALTHY, HEALTHY, UNHEALTHY):
        run_round(poller, clock)
        assert a.status == expected
    fleet.behaviour["a.test"] = "ok"
    for expected in (UNHEALTHY, HEALTHY):
        run_round(poller, clock)
        assert a.status == expected


def test_first_failure_makes_unknown_unhealthy() -> None:
    poller, registry, fleet, clock, _ = make(BackendConfig(name="a", url="http://a.test"))
    fleet.behaviour["a.test"] = "garbage"
    run_round(poller, clock)
    assert registry.get("a").status == UNHEALTHY
    assert "invalid JSON" in (registry.get("a").last_error or "")


def test_discovery_by_type_replaces_models_with_config_floor() -> None:
    poller, registry, fleet, clock, latencies = make(
        BackendConfig(name="o", url="http://o.test", type="ollama", models=("floor",)),
        BackendConfig(name="l", url="http://l.test", type="llamacpp"),
        BackendConfig(name="v", url="http://v.test", type="vllm"),
    )
    fleet.models = {"o.test": ["llama3:8b"], "l.test": ["qwen"], "v.test": ["mistral"]}
    run_round(poller, clock)
    assert registry.get("o").models == {"llama3:8b", "floor"}
    assert registry.get("l").models == {"qwen"}
    assert registry.get("v").models == {"mistral"}
    assert ("o.test", b"/api/tags") in fleet.paths
    assert ("l.test", b"/health") in fleet.paths and ("l.test", b"/v1/models") in fleet.paths
    assert ("v.test", b"/v1/models") in fleet.paths
    assert registry.by_model["qwen"] == (registry.get("l"),)
    # one latency sample per HTTP response: ollama 1, llamacpp 2, vllm 1
    assert sorted(b for b, _ in latencies) == ["l", "l", "o", "v"]
    fleet.models["v.test"] = ["other"]
    run_round(poller, clock)
    assert registry.get("v").models == {"other"}
    assert "mistral" not in registry.by_model


def test_llamacpp_loading_is_unhealthy() -> None:
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="l", url="http://l.test", type="llamacpp")
    )
    fleet.behaviour["l.test"] = "loading"
    run_round(poller, clock)
    assert registry.get("l").status == UNHEALTHY


def test_hung_backend_is_bounded_and_does_not_stall_others() -> None:
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="hung", url="http://hung.test"),
        BackendConfig(name="ok", url="http://ok.test"),
        timeout_seconds=5.0,
    )
    fleet.behaviour["hung.test"] = "hang"
    done = run_round(poller, clock)
    # The healthy one is decided at once, the round waits only for the timeout.
    assert registry.get("ok").status == HEALTHY
    assert registry.get("hung").status == UNKNOWN
    assert done == []
    clock.advance(4.9)
    assert done == []
    clock.advance(0.2)
    assert done == [None]
    assert registry.get("hung").status == UNHEALTHY


def test_backend_key_is_sent_on_probes() -> None:
    poller, _, fleet, clock, _ = make(
        BackendConfig(name="a", url="http://a.test", api_key_env="K"), environ={"K": "secret"}
    )
    run_round(poller, clock)
    assert fleet.auth["a.test"] == b"Bearer secret"


def test_last_check_and_last_error_describe_the_last_attempt() -> None:
    wall = Clock()
    wall.advance(1_700_000_000.0)
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="a", url="http://a.test"),
        wall_clock=wall.seconds,
        failure_threshold=2,
        recovery_threshold=2,
    )
    a = registry.get("a")
    assert (a.last_check, a.last_error) == (None, None)
    steps = [  # (probe answer, status, last_error) after each round, 30 s apart
        ("ok", HEALTHY, None),
        ("fail", HEALTHY, "GET /v1/models answered 500"),  # below the threshold
        ("fail", UNHEALTHY, "GET /v1/models answered 500"),
        ("ok", UNHEALTHY, "GET /v1/models answered 500"),  # recovering: the cause stays
        ("ok", HEALTHY, None),
    ]
    for i, (answer, status, error) in enumerate(steps):
        fleet.behaviour["a.test"] = answer
        run_round(poller, clock)
        assert (a.status, a.last_error, a.last_check) == (
            status,
            error,
            1_700_000_000.0 + 30 * i,
        ), i
        wall.advance(30)
    assert format_timestamp(a.last_check) == "2023-11-14T22:15:20.000Z"


def test_last_check_is_when_a_hung_probe_started_once_it_gave_up() -> None:
    wall = Clock()
    wall.advance(1_700_000_000.0)
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="hung", url="http://hung.test"), wall_clock=wall.seconds
    )
    fleet.behaviour["hung.test"] = "hang"
    run_round(poller, clock)
    hung = registry.get("hung")
    wall.advance(5)
    assert hung.last_check is None  # still in flight: nothing to report yet
    clock.advance(5.1)
    assert hung.status == UNHEALTHY
    assert hung.last_check == 1_700_000_000.0
    assert hung.last_error == "no answer within 5 s"


def test_rounds_follow_the_fleet_as_it_changes() -> None:
    poller, registry, fleet, clock, _ = make(BackendConfig(name="a", url="http://a.test"))
    added = registry.add(BackendConfig(name="b", url="http://b.test", type="ollama"))
    fleet.models["b.test"] = ["llama3:8b"]
    run_round(poller, clock)
    assert added.status == HEALTHY and registry.by_model["llama3:8b"] == (added,)
    registry.remove("a")
    fleet.paths.clear()
    run_round(poller, clock)
    assert fleet.paths == [("b.test", b"/api/tags")]


def test_a_probe_finishing_after_its_backend_was_removed_changes_nothing() -> None:
    poller, registry, fleet, clock, _ = make(
        BackendConfig(name="a", url="http://a.test"), BackendConfig(name="b", url="http://b.test")
    )
    fleet.behaviour["a.test"] = "hold"
    done = run_round(poller, clock)
    assert len(fleet.held) == 1 and done == []
    registry.remove("a")
    request = fleet.held.pop()
    request.write(json.dumps({"data": [{"id": "ghost"}]}).encode())
    request.finish()
    poller.http.flush()
    assert done == [None]
    assert "ghost" not in registry.by_model and not registry.is_known_model("ghost")
    assert [b.name for b in registry.backends] == ["b"]
