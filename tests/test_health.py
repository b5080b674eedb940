"""Health polling: the status state machine and discovery, driven by a Clock."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from nexus.config import BackendConfig, HealthCheckConfig
from nexus.health import HealthPoller
from nexus.registry import HEALTHY, UNHEALTHY, UNKNOWN, BackendRegistry


class Fleet(Resource):
    """Answers every probe according to ``behaviour[host]``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.behaviour: dict[str, str] = {}
        self.models: dict[str, list[str]] = {}
        self.paths: list[tuple[str, bytes]] = []
        self.auth: dict[str, bytes | None] = {}

    def render_GET(self, request: Any) -> Any:
        host = request.getRequestHostname().decode()
        self.paths.append((host, request.path))
        self.auth[host] = request.getHeader(b"authorization")
        how = self.behaviour.get(host, "ok")
        if how == "hang":
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
    *backends: BackendConfig, environ: dict[str, str] | None = None, **health: Any
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
